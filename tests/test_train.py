"""The train stage end to end on a real DeepSpeed engine (CPU, gloo), with a tiny model."""

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from grpolab import config
from grpolab.algos.credit import MITIGATIONS
from grpolab.errors import ConfigError
from grpolab.models import load_model
from grpolab.paths import CHECKPOINT_DIR, CURVE_FILE, TRAINED_DIR
from grpolab.stages import run_stage
from grpolab.stages.train import DEEPSPEED_CONFIG_ARTIFACT
from grpolab.trainer.engine import deepspeed_config

from conftest import grpolab
from training import (
    SAME_BATCH,
    SEPARATE,
    STEP_METRICS,
    TIMINGS,
    TRACIN_KEYS,
    ZERO_RUN,
    mlflow_client,
    tied_reward,
    train_runs,
    trained_weights,
    working_in,
)


def test_train_logs_every_metric_and_saves_the_model(trainer):
    params = config.load()
    summary = run_stage("train", params)
    assert summary["train/steps"] == 4
    client = mlflow_client()
    runs = train_runs(client)
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    for key in STEP_METRICS:
        history = client.get_metric_history(run_id, key)
        assert [m.step for m in history] == [1, 2, 3, 4] and all(math.isfinite(m.value) for m in history), key
    artifacts = {f.path for f in client.list_artifacts(run_id)} | {f.path for f in client.list_artifacts(run_id, "completions")}
    assert {"completions/step_000002.json", "completions/step_000004.json", "reward_curve.png", "train_curve.csv"} <= artifacts
    table = pd.read_json(client.download_artifacts(run_id, "completions/step_000002.json", str(trainer)), orient="split")
    assert {"prompt", "completion", "reward", "advantage", "reward/answer_match"} <= set(table.columns)
    assert len(table) == 16
    ds_config = json.loads(Path(client.download_artifacts(run_id, DEEPSPEED_CONFIG_ARTIFACT, str(trainer))).read_text())
    assert ds_config == deepspeed_config(params, bf16=False) and ds_config["train_batch_size"] == 16
    curve = pd.read_csv(CURVE_FILE)
    assert curve["step"].tolist() == [1, 2, 3, 4]
    assert not CHECKPOINT_DIR.exists()
    base = load_model("models/base").state_dict()
    assert any(not torch.equal(base[k], v) for k, v in trained_weights().items())




@pytest.fixture(scope="module")
def zero_0(base_project, tmp_path_factory):
    """(weights, curve) of a ZeRO-0 training, the trajectory ZeRO-2/3 must follow; trained once."""
    root = tmp_path_factory.mktemp("zero0") / "p"
    shutil.copytree(base_project, root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        run_stage("train", config.apply_overrides([*ZERO_RUN, "train.deepspeed.zero_stage=0"]))
        return trained_weights(), pd.read_csv(CURVE_FILE)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("knobs", [
    ["train.deepspeed.zero_stage=2"],
    ["train.deepspeed.zero_stage=3"],
    # what a model too big for its GPU runs with: optimizer state offloaded, stepped by CPU Adam
    ["train.deepspeed.zero_stage=3", "train.deepspeed.offload_optimizer=true"],
], ids=["zero2", "zero3", "zero3-offload"])
def test_zero_stages_follow_the_zero_0_trajectory(trainer, zero_0, knobs):
    zero_0, curve_0 = zero_0
    params = config.apply_overrides([*ZERO_RUN, *knobs])
    assert ("offload_optimizer" in deepspeed_config(params, bf16=False)["zero_optimization"]) == params.train.deepspeed.offload_optimizer
    run_stage("train", params)
    assert len(list(Path("metrics/tracin").glob("step_*.parquet"))) == 2
    # the same updates from partitioned gradients / optimizer state / parameters, up to float32 reduction order
    for key, value in trained_weights().items():
        torch.testing.assert_close(value, zero_0[key], rtol=1e-4, atol=1e-5, msg=key)
    for column in ("train/reward_mean", "train/loss", "train/entropy"):
        torch.testing.assert_close(torch.tensor(pd.read_csv(CURVE_FILE)[column].values), torch.tensor(curve_0[column].values),
                                   rtol=1e-4, atol=1e-5, msg=column)


def test_gradient_checkpointing_trains_the_same_model(trainer, tmp_path):
    """3 steps: rollouts are sampled in eval mode after each update left the model in train mode (with
    checkpointing on, transformers turns the KV cache off in train mode and decoding failed at step 2)."""
    plain = tmp_path / "plain"
    shutil.copytree(trainer, plain)
    run = ["train.steps=3", "train.loss.kl_beta=0"]
    with working_in(plain):
        run_stage("train", config.apply_overrides(run))
    run_stage("train", config.apply_overrides([*run, "train.gradient_checkpointing=true"]))
    # Activations recomputed in the backward pass: the same loss and gradient, up to float32 reduction order.
    # (Later steps are not compared: Adam's first update is about lr * sign(g), so a gradient element at
    # rounding-noise level moves its weight by up to lr either way, and the next rollouts may differ.)
    one, checkpointed = pd.read_csv(plain / CURVE_FILE), pd.read_csv(CURVE_FILE)
    assert checkpointed["step"].tolist() == [1, 2, 3]
    for column in ("train/loss", "train/grad_norm", "train/entropy"):
        assert checkpointed[column].iloc[0] == pytest.approx(one[column].iloc[0], rel=1e-5), column
        assert checkpointed[column].notna().all(), column
    assert checkpointed["train/reward_mean"].iloc[0] == one["train/reward_mean"].iloc[0]  # the same rollouts


def test_micro_batches_cut_to_their_width_give_the_whole_batchs_step(trainer, tmp_path):
    """Rows sorted by length into micro-batches of 4, each cut to its own width, against the whole batch of 16 in
    one micro-batch: the same step up to the order of summation."""
    whole = tmp_path / "whole"
    shutil.copytree(trainer, whole)
    run = ["train.steps=1", "train.mitigation.name=entropy_masking"]
    with working_in(whole):
        run_stage("train", config.apply_overrides([*run, "train.micro_batch_size=16"]))
    run_stage("train", config.apply_overrides([*run, "train.micro_batch_size=4"]))
    one, cut = pd.read_csv(whole / CURVE_FILE), pd.read_csv(CURVE_FILE)
    for column in ("train/loss", "train/kl", "train/grad_norm", "train/entropy", "credit/answer_share", "credit/gini"):
        assert cut[column].item() == pytest.approx(one[column].item(), rel=1e-5, abs=1e-8), column
    expected = load_model(whole / TRAINED_DIR).state_dict()
    changed = 0
    for key, value in trained_weights().items():
        # Adam's first step is lr * sign(g): an element whose gradient is at rounding level may go either way
        changed += int((value - expected[key]).abs().gt(1e-6).sum())
    assert changed <= 1e-3 * sum(v.numel() for v in expected.values())


@pytest.mark.parametrize("zero_stage", ["null", "3"])  # null: 1 under bf16
def test_bf16_on_cpu_starts_at_kl_0_accumulates_in_fp32_and_saves_the_fp32_master_weights(trainer, zero_stage):
    """model.dtype=bfloat16 on CPU (DeepSpeed's bf16 runs there at ZeRO >= 1): the reference, loaded in bf16
    with RoPE's buffer in fp32 like the policy's, is the policy's own model at step 1, so the KL is exactly 0."""
    params = config.apply_overrides(["model.dtype=bfloat16", "train.steps=2", "train.loss.kl_beta=0.1", "train.optim.learning_rate=0.01",
                                     "train.optim.warmup_steps=0",  # warm-up starts at lr 0: step 2 would equal step 1
                                     f"train.deepspeed.zero_stage={zero_stage}"])
    run_stage("train", params)
    curve = pd.read_csv(CURVE_FILE)
    assert curve["train/kl"].iloc[0] == 0 and curve["train/kl"].iloc[1] > 0
    assert (curve["train/grad_norm"] > 0).all()  # DeepSpeed's, from the fp32 gradients
    client = mlflow_client()
    run = train_runs(client)[0]
    ds_config = json.loads(Path(client.download_artifacts(run.info.run_id, DEEPSPEED_CONFIG_ARTIFACT, str(trainer))).read_text())
    assert ds_config["bf16"] == {"enabled": True} and ds_config["zero_optimization"]["stage"] == (1 if zero_stage == "null" else 3)
    assert ds_config["data_types"] == {"grad_accum_dtype": "fp32"}
    weights = trained_weights()
    assert {v.dtype for v in weights.values()} == {torch.float32}
    # the optimizer's fp32 master weights, not the bf16 copies the forward ran on
    assert any(not torch.equal(v, v.bfloat16().float()) for v in weights.values())


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.group_size=1", "train.group_size: Input should be greater than or equal to 2"),
        ("train.micro_batch_size=5", "train: micro_batch_size (5) must divide the per-process batch"),
        ("train.rewards.weights={}", "train.rewards.weights: Value error, needs at least one reward function".replace("Value error, ", "")),
        ("train.rewards.weights={length: 1}", "train.rewards.weights: unknown reward 'length'"),
        ("train.loss.kl_estimator=k4", "train.loss.kl_estimator: Input should be 'k1', 'k2' or 'k3'"),
        ("train.loss.loss_agg_mode=sum", "train.loss.loss_agg_mode: Input should be 'token-mean'"),
        ("train.rewards.judge_model=nowhere", "train.rewards.judge_model: no Hugging Face model folder (config.json) at nowhere"),
        ("train.num_processes=3", "train: prompts_per_step (4) must divide evenly across num_processes (3)"),
        (["train.deepspeed.offload_optimizer=true", "train.deepspeed.zero_stage=0"],
         "train.deepspeed: offload_optimizer needs zero_stage 1, 2 or 3"),
        (["train.gradient_checkpointing=true", *SAME_BATCH], "train: gradient_checkpointing cannot be combined with tracin.use_tracin"),
        (["train.rewards.overlong_buffer.enable=true", "train.rewards.overlong_buffer.len=24"],
         "train: rewards.overlong_buffer.len (24) must be below max_new_tokens (24)"),
        ("train.loss.policy.name=ppo", "train.loss.policy: name: 'ppo' is none of 'ppo_clip', 'gspo', 'cispo'"),
        ("train.loss.advantage_estimator=remax", "train.loss.advantage_estimator: Input should be 'grpo', 'rloo' or 'opo'"),
        ("train.gspo_clip_high=0.001", "train.gspo_clip_high=0.001: moved to train.loss.policy.clip_high (with train.loss.policy.name: gspo)"),
        ("train.dynamic_sampling.max_rollout_batches=8", "train.dynamic_sampling.max_rollout_batches: not a knob of `enable: false`"),
        ("train.rewards.overlong_buffer.penalty_factor=0.5", "train.rewards.overlong_buffer.penalty_factor: not a knob of `enable: false`"),
    ],
)
def test_bad_train_params_are_rejected_before_work(trainer, override, message):
    before = Path("params.yaml").read_text()
    with pytest.raises(ConfigError) as err:
        config.apply_overrides([override] if isinstance(override, str) else override)
    assert message in str(err.value)
    assert Path("params.yaml").read_text() == before


def test_bad_input_through_the_cli_exits_nonzero_naming_the_key(trainer):
    proc = grpolab("stage", "train", "-S", "train.group_size=1", cwd=trainer, check=False)
    assert proc.returncode == 2 and "train.group_size: Input should be greater than or equal to 2" in proc.stderr
    shutil.rmtree("models/base")
    proc = grpolab("stage", "train", cwd=trainer, check=False)
    assert proc.returncode == 2 and "models/base: no base model (run the sft stage first)" in proc.stderr
    assert not TRAINED_DIR.exists()


def _rewrite_weights(weight) -> None:
    """Set every train prompt's mia_weight (None: drop it) in data/train_weighted.parquet."""
    from grpolab.data.schema import write_parquet

    data = pd.read_parquet("data/train_weighted.parquet")
    strip = lambda info: {k: v for k, v in info.items() if not k.startswith("mia_")}  # noqa: E731
    data["extra_info"] = [strip(x) if weight is None else {**strip(x), "mia_weight": weight} for x in data["extra_info"]]
    write_parquet(data, "data/train_weighted.parquet")


def test_mia_weighted_loss_logs_its_weights_and_falls_back_to_plain_grpo(trainer, tmp_path, capsys):
    def train(*overrides: str) -> None:  # as `grpolab stage train -S ...` runs it: the overrides persist in params.yaml
        run_stage("train", config.apply_overrides(list(overrides)))

    on = ["train.steps=4", "train.mia_weighting.use_mia_weighted_loss=true", "train.mia_weighting.mia_weighting_mode=quadratic",
          "train.mia_weighting.mia_invert_weights=true"]
    train(*on)
    raw = torch.tensor([x["mia_weight"] for x in pd.read_parquet("data/train_weighted.parquet")["extra_info"]], dtype=torch.float64)
    w = (1 - raw) ** 2
    line = (f"MIA-weighted loss enabled: mode=quadratic, invert=True, weight_mean={w.mean():.4f}, weight_std={w.std():.4f}, "
            f"weight_min={w.min():.4f}, weight_max={w.max():.4f}")
    assert line in capsys.readouterr().out
    client = mlflow_client()
    run = train_runs(client)[0]
    assert run.data.metrics["mia/weight_mean"] == pytest.approx(w.mean().item())
    assert run.data.metrics["mia/weight_max"] == pytest.approx(w.max().item())
    weighted = trained_weights()

    # Weights of 1 (linear) train exactly like plain GRPO; no weights at all: plain GRPO and a warning.
    plain_dir = tmp_path / "plain"
    shutil.copytree(trainer, plain_dir)
    with working_in(plain_dir):
        train("train.mia_weighting.use_mia_weighted_loss=false")
    plain = load_model(plain_dir / TRAINED_DIR).state_dict()
    assert any(not torch.equal(plain[k], v) for k, v in weighted.items())
    _rewrite_weights(1.0)
    train(*on[:2], "train.mia_weighting.mia_weighting_mode=linear", "train.mia_weighting.mia_invert_weights=false")
    assert all(torch.equal(plain[k], v) for k, v in trained_weights().items())
    # Rescaled to mean 1 over each batch, weights of 0.5 everywhere are weights of 1 (without: a smaller step).
    _rewrite_weights(0.5)
    train("train.mia_weighting.mia_normalize_weights=true")
    assert all(torch.equal(plain[k], v) for k, v in trained_weights().items())
    train("train.mia_weighting.mia_normalize_weights=false")
    assert any(not torch.equal(plain[k], v) for k, v in trained_weights().items())
    _rewrite_weights(None)
    capsys.readouterr()
    with pytest.warns(UserWarning, match="no extra_info.mia_weight: training plain GRPO"):
        train(*on)
    assert "MIA-weighted loss enabled" not in capsys.readouterr().out
    assert all(torch.equal(plain[k], v) for k, v in trained_weights().items())


@pytest.mark.parametrize("mitigation", list(MITIGATIONS))
def test_every_mitigation_trains_and_logs_credit(trainer, mitigation):
    params = config.apply_overrides(["train.steps=2", f"train.mitigation.name={mitigation}", "train.log.credit_log_every=2"])
    run_stage("train", params)
    client = mlflow_client()
    run = train_runs(client)[0]
    for key in ("credit/answer_share", "credit/think_share", "credit/high_entropy_share", "credit/gini", "train/grad_norm"):
        values = [m.value for m in client.get_metric_history(run.info.run_id, key)]
        assert len(values) == 2 and all(math.isfinite(v) for v in values), key
    assert "credit/step_000002.parquet" in {f.path for f in client.list_artifacts(run.info.run_id, "credit")}
    log = pd.read_parquet("metrics/credit/step_000002.parquet")
    assert {"token", "class", "credit", "entropy", "logprob", "weight", "advantage"} <= set(log.columns)
    assert set(log["class"]) <= {"think", "answer", "tag", "other"}
    # the logged tokens are the step's: their answer share is the metric's; no advantage x weight, no credit
    (answer_share,) = [m.value for m in client.get_metric_history(run.info.run_id, "credit/answer_share") if m.step == 2]
    assert log.loc[log["class"] == "answer", "credit"].sum() / log["credit"].sum() == pytest.approx(answer_share, rel=1e-5)
    assert (log.loc[log["advantage"] * log["weight"] == 0, "credit"] == 0).all()
    if mitigation == "none":
        assert (log["weight"] == 1.0).all()


def test_attention_credit_reads_the_policy_in_eval_mode_from_step_2(trainer, monkeypatch):
    """After step 1 the update has left the policy training: with LoRA's dropout on, attention_credit's
    weights are still those of the policy in eval mode, and whatever mode it is handed, its pass leaves it so."""
    from grpolab.trainer.loss_weights import LossWeighting

    original, seen = LossWeighting.loss_weights, []

    def spy(self, rollout, rows, classes, model, micro_batches):
        weights = original(self, rollout, rows, classes, model, micro_batches)
        mode = model.training
        model.eval()
        in_eval = original(self, rollout, rows, classes, model, micro_batches).token
        model.train()
        from_train = original(self, rollout, rows, classes, model, micro_batches).token
        assert model.training
        model.train(mode)
        seen.append((weights.token, in_eval, from_train))
        return weights

    monkeypatch.setattr(LossWeighting, "loss_weights", spy)
    run_stage("train", config.apply_overrides(["train.steps=2", "train.mitigation.name=attention_credit", "model.lora.r=4",
                                               "model.lora.alpha=8", "model.lora.dropout=0.5", "train.optim.learning_rate=0.01",
                                               "train.optim.warmup_steps=0"]))  # step 1 moves the adapters: dropout then matters
    assert len(seen) == 2 and (seen[1][1] != 1).any()  # answer tokens drew attention: weights that dropout would move
    for weights, in_eval, from_train in seen:
        assert torch.equal(weights, in_eval) and torch.equal(from_train, in_eval)


def test_analyze_credit_compares_runs_in_mlflow(trainer):
    run_ids = []
    client = mlflow_client()
    for mitigation in ("none", "entropy_masking"):
        run_stage("train", config.apply_overrides(["train.steps=2", f"train.mitigation.name={mitigation}", "train.log.credit_log_every=1"]))
        runs = train_runs(client, order_by=["attributes.start_time DESC"])
        run_ids.append(runs[0].info.run_id)
    proc = grpolab("analyze-credit", *run_ids, "--out", "reports/credit", cwd=trainer)
    assert "| none (" in proc.stdout and "| entropy_masking (" in proc.stdout
    files = {p.name for p in Path("reports/credit").iterdir()}
    assert files == {"credit_share_by_class.png", "credit_vs_entropy.png", "learning_and_grad_norm.png", "summary.md", ".grpolab-output"}
    report = client.search_runs([client.get_experiment_by_name("grpolab").experiment_id], "tags.`grpolab.stage` = 'analyze-credit'")
    assert len(report) == 1 and report[0].data.tags["grpolab.compared_runs"] == ",".join(run_ids)
    assert "summary.md" in {f.path for f in client.list_artifacts(report[0].info.run_id)}
    proc = grpolab("analyze-credit", "0123456789abcdef", cwd=trainer, check=False)
    assert proc.returncode == 2 and "run 0123456789abcdef: not found" in proc.stderr
    # a folder of the user's (here the project's data/) is refused, not replaced
    before = sorted(p.relative_to("data") for p in Path("data").rglob("*"))
    proc = grpolab("analyze-credit", *run_ids, "--out", "data", cwd=trainer, check=False)
    assert proc.returncode == 2 and "--out data: the folder holds files grpolab did not write" in proc.stderr
    assert sorted(p.relative_to("data") for p in Path("data").rglob("*")) == before


@pytest.mark.parametrize("mode", ["same_batch", "separate"])
def test_tracin_logs_its_diagnostics_and_influence_log(trainer, mode, capsys):
    overrides = SAME_BATCH if mode == "same_batch" else SEPARATE
    run_stage("train", config.apply_overrides(["train.steps=2", *overrides]))
    printed = capsys.readouterr()
    assert (printed.out + printed.err).count("tracin step ") == 2  # one summary line per influence step
    client = mlflow_client()
    run = train_runs(client)[0]
    keys = TRACIN_KEYS + (["tracin/val_reward_mean", "tracin/val_advantage_min", "tracin/val_advantage_max"] if mode == "separate" else [])
    for key in keys:
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2] and all(math.isfinite(m.value) for m in history), key
    ratios = [run.data.metrics[f"tracin/{k}_ratio"] for k in ("positive", "negative", "zero")]
    assert sum(ratios) == pytest.approx(1.0)
    assert {"tracin/step_000001.parquet", "tracin/step_000002.parquet"} <= {f.path for f in client.list_artifacts(run.info.run_id, "tracin")}
    log = pd.read_parquet("metrics/tracin/step_000002.parquet")
    assert list(log.columns) == ["step", "row", "prompt", "completion", "reward", "advantage", "influence", "kept"] and len(log) == 16
    assert ((log["advantage"] == 0) <= (log["influence"] == 0)).all()  # no policy-gradient term, no influence
    selected = log["kept"].mean()
    assert selected == pytest.approx(run.data.metrics["tracin/selected_ratio"])
    if not run.data.metrics["tracin/fallback"]:
        assert (log["kept"] == (log["influence"] > 0)).all()
    curve = pd.read_csv(CURVE_FILE)
    assert set(keys) <= set(curve.columns) and curve["tracin/selected_ratio"].notna().all()


def test_tracin_composes_with_mia_weights_credit_mitigation_and_ppo_epochs(trainer, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(trainer, plain)
    common = ["train.steps=4", "train.ppo_epochs=2", "train.mia_weighting.use_mia_weighted_loss=true", "train.mitigation.name=entropy_weighted"]
    grpolab("stage", "train", *[f"-S{o}" for o in common], cwd=plain)
    run_stage("train", config.apply_overrides([*common, *SAME_BATCH, "train.tracin.selection_unit=prompt"]))
    client = mlflow_client()
    run = train_runs(client)[0]
    # Influence once per batch of rollouts, from the batch as sampled: steps 1 and 3 of 2 epochs each.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "tracin/selected_ratio")] == [1, 3]
    assert "mia/weight_mean" in run.data.metrics
    log = pd.read_parquet("metrics/tracin/step_000003.parquet")
    kept_by_prompt = log.groupby(log["row"] // 4)["kept"].agg(["min", "max"])
    assert (kept_by_prompt["min"] == kept_by_prompt["max"]).all()  # prompt units: a group is kept or dropped whole
    dropped = not all(pd.read_parquet(f"metrics/tracin/step_{s:06d}.parquet")["kept"].all() for s in (1, 3))
    other = load_model(plain / TRAINED_DIR).state_dict()
    assert dropped == any(not torch.equal(other[k], v) for k, v in trained_weights().items())


def test_tracin_captures_a_token_budget_at_a_time_and_keeps_no_layers_gradient_past_its_use(trainer, monkeypatch):
    """Memory bounded by a chunk of train.tracin.capture_tokens positions, and within it by one layer: every
    captured gradient is dropped once consumed (none alive when its capture returns), two passes over the chunks
    (the batch gradient, then the products)."""
    import gc
    import weakref

    import grpolab.trainer.tracin

    budget, shapes, alive = 160, [], []  # each capture's [rows, positions]; records still alive after each capture
    capture = grpolab.trainer.tracin.GradientProbe.capture

    def counted(self, forward, valid, consume, packed_rows=None):
        taken = []

        def consume_and_track(record):
            taken.append(weakref.ref(record))
            consume(record)

        capture(self, forward, valid, consume_and_track, packed_rows)
        gc.collect()
        shapes.append(tuple(valid.shape))
        alive.append(sum(ref() is not None for ref in taken))

    monkeypatch.setattr(grpolab.trainer.tracin.GradientProbe, "capture", counted)
    run_stage("train", config.apply_overrides(["train.steps=1", *SAME_BATCH, f"train.tracin.capture_tokens={budget}"]))
    log = pd.read_parquet("metrics/tracin/step_000001.parquet")
    assert len(shapes) % 2 == 0 and len(shapes) >= 4 and set(alive) == {0}
    assert all(rows * positions <= budget or rows == 1 for rows, positions in shapes)
    assert sum(rows for rows, _ in shapes[: len(shapes) // 2]) == int((log["advantage"] != 0).sum())  # each active row once a pass


def test_tracin_every_n_batches(trainer):
    run_stage("train", config.apply_overrides(["train.steps=3", *SAME_BATCH, "train.tracin.every=2"]))
    curve = pd.read_csv(CURVE_FILE)
    assert curve["tracin/selected_ratio"].notna().tolist() == [True, False, True]
    assert sorted(p.name for p in Path("metrics/tracin").iterdir()) == ["step_000001.parquet", "step_000003.parquet"]


def test_tracins_random_control_trains_as_many_completions_drawn_at_random(trainer):
    run_stage("train", config.apply_overrides(["train.steps=2", *SEPARATE, "train.tracin.keep=random"]))
    differ = False
    for step in (1, 2):
        log = pd.read_parquet(f"metrics/tracin/step_{step:06d}.parquet")
        chosen = log["influence"] > 0  # what the influence selection keeps (no fallback here: some are positive)
        assert chosen.any() and log["kept"].sum() == chosen.sum()
        differ |= not log["kept"].equals(chosen)
    assert differ


def test_tracin_off_is_plain_grpo_bit_for_bit(trainer, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(trainer, plain)
    grpolab("stage", "train", "-S", "train.steps=2", cwd=plain)
    run_stage("train", config.apply_overrides(["train.steps=2", "train.tracin.every=3", "train.tracin.fallback_top_fraction=0.9"]))
    other = load_model(plain / TRAINED_DIR).state_dict()
    assert all(torch.equal(other[k], v) for k, v in trained_weights().items())
    assert not any(Path("metrics/tracin").iterdir())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.tracin.validation.val_selection=top"], "train.tracin.validation.val_selection: not a knob of `name: same_batch`"),
        (["train.tracin.validation.name=separate", "train.tracin.validation.val_selection=top", "train.tracin.validation.val_pool_size=64"],
         "val_selection: `top` picks val_batch_size (64) out of val_pool_size (64), which keeps them all"),
        (["train.tracin.validation.name=separate", "train.tracin.validation.val_batch_size=32", "train.tracin.validation.val_pool_size=16"],
         "val_pool_size (16) must be at least val_batch_size (32)"),
        (["train.tracin.use_tracin=true", "train.tracin.validation.name=separate"],
         "train.tracin.validation.val_pool_size: 64 validation prompts per influence step, but data.num_val is 16"),
        (["train.tracin.fallback_top_fraction=0"], "train.tracin.fallback_top_fraction: Input should be greater than 0"),
        (["train.tracin.every=0"], "train.tracin.every: Input should be greater than or equal to 1"),
        (["train.tracin.validation.name=separate", "train.tracin.validation.val_loss=mse"], "train.tracin.validation.val_loss: Input should be 'seqloss-lastadv', 'seqloss-reward' or 'contrastive'"),
        (["train.tracin.validation.name=separate", "train.tracin.validation.val_pool_size=15", "train.tracin.validation.val_batch_size=8",
          "train.tracin.use_tracin=true", "train.num_processes=2"], "tracin.validation.val_pool_size (15) must divide evenly across num_processes (2)"),
    ],
)
def test_bad_tracin_params_are_rejected_before_work(trainer, overrides, message):
    before = Path("params.yaml").read_text()
    with pytest.raises(ConfigError) as err:
        config.apply_overrides(overrides)
    assert message in str(err.value)
    assert Path("params.yaml").read_text() == before


def _tree_digest(*roots: str) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for root in roots for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_bad_inputs_are_named_before_any_output(trainer):
    """Issue 11, req 7: each gives `grpolab: error: …` naming the key, file or row, exit 2, and writes nothing."""
    from transformers import AutoTokenizer

    from grpolab.data.tokenizer import train_tokenizer
    from grpolab.models import build_model, save_model

    no_eos = trainer / "no_eos"
    shutil.copytree("models/base", no_eos)
    tokenizer = AutoTokenizer.from_pretrained(no_eos)
    tokenizer.eos_token = None
    tokenizer.pad_token = None
    tokenizer.save_pretrained(no_eos)
    other = train_tokenizer([f"{i} apples and {i} pears" for i in range(200)], 320)  # merges of its own: another vocabulary
    save_model(build_model(config.load().model.model_copy(update={"vocab_size": 320}), other, 0), other, trainer / "other_ref")

    cases = [
        ("train", ["train.max_new_tokens=62"], "train.max_new_tokens: data/train_weighted.parquet: row",
         "exceed the model's 64 positions"),
        ("evaluate", ["eval.max_new_tokens=62"], "eval.max_new_tokens: data/eval.parquet: row", "exceed the model's 64 positions"),
        ("prepare", [f"model.name_or_path={no_eos}"], f"model.name_or_path: the tokenizer in {no_eos} has no EOS token", ""),
        ("train", ["train.rewards.judge_model=models/base"], "train.rewards.judge_model: models/base has no trained classification head",
         "score.weight"),
        ("mia", ["mia.method=reference", f"mia.reference_model={trainer / 'other_ref'}"],
         f"mia.reference_model: the tokenizer in {trainer / 'other_ref'} differs from the base model's", ""),
    ]
    before = _tree_digest("data", "models", "metrics")
    for stage, overrides, message, detail in cases:
        with pytest.raises(ConfigError) as err:
            run_stage(stage, config.overridden(overrides)[1])
        assert message in str(err.value) and detail in str(err.value), (stage, str(err.value))
    assert _tree_digest("data", "models", "metrics") == before and not CHECKPOINT_DIR.exists()
    # through the CLI: the message, exit code 2, no traceback
    proc = grpolab("stage", "train", "-S", "train.max_new_tokens=62", cwd=trainer, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "grpolab: error: train.max_new_tokens: data/train_weighted.parquet: row" in proc.stderr
    assert _tree_digest("data", "models", "metrics") == before


def test_mia_reference_and_precomputed_weights_end_to_end(trainer, tmp_path):
    """The two MIA methods that read a user's model or data, through mia -> train -> evaluate."""
    from grpolab.paths import SCORES_FILE, WEIGHTED_TRAIN_FILE

    reference = trainer / "reference_model"  # the base model's tokenizer, other weights: a model trained elsewhere
    shutil.copytree("models/base", reference)
    model = load_model(reference)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(reference)

    overrides = ["train.steps=2", "mia.method=reference", f"mia.reference_model={reference}", "eval.mia_methods=[reference]"]
    for stage in ("mia", "train", "evaluate"):
        summary = run_stage(stage, config.apply_overrides(overrides))
    scores = pd.read_parquet(SCORES_FILE)
    assert scores["score"].nunique() > 10  # the two models disagree prompt by prompt
    weighted = pd.read_parquet(WEIGHTED_TRAIN_FILE)
    assert {x["mia_method"] for x in weighted["extra_info"]} == {"reference"}
    from scipy.stats import rankdata

    train_scores = scores.loc[scores["split"] == "train", "score"].to_numpy()
    np.testing.assert_allclose([x["mia_weight"] for x in weighted["extra_info"]],
                               (rankdata(train_scores) - 1) / (len(train_scores) - 1), atol=1e-6)
    assert {"base/mia/reference/auc", "trained/mia/reference/auc"} <= set(summary)
    assert Path("metrics/mia_roc/reference.csv").is_file()

    # precomputed: the user's own weights, from their train file's extra_info, reach the loss unchanged
    train = pd.read_parquet("data/train.parquet")
    mine = np.round(np.linspace(0.0, 1.0, len(train)), 6)
    train["extra_info"] = [{**info, "mia_weight": float(w)} for info, w in zip(train["extra_info"], mine)]
    train.to_parquet("data/train.parquet")
    for stage in ("mia", "train"):
        summary = run_stage(stage, config.apply_overrides(["mia.method=precomputed", "mia.reference_model=null",
                                                           "eval.mia_methods=[loss]", "train.mia_weighting.use_mia_weighted_loss=true"]))
    weighted = pd.read_parquet(WEIGHTED_TRAIN_FILE)
    assert [x["mia_weight"] for x in weighted["extra_info"]] == mine.tolist()
    assert {x["mia_method"] for x in weighted["extra_info"]} == {"precomputed"}
    client = mlflow_client()
    run = train_runs(client, order_by=["attributes.start_time DESC"])[0]
    assert run.data.metrics["mia/weight_mean"] == pytest.approx(mine.mean(), abs=1e-6)


def test_lora_trains_adapters_against_the_disabled_adapter_reference_and_saves_adapter_and_merged_model(trainer, monkeypatch):
    """model.lora: only the adapters train (TracIn's inner products over them alone), with a credit mitigation;
    the KL reference is the policy with its adapters off (the base model is loaded once, no second copy);
    models/trained holds PEFT's adapter and the merged model."""
    from peft import PeftModel

    import grpolab.stages.train
    import grpolab.trainer.tracin
    from grpolab.models import ADAPTER_DIR
    from grpolab.paths import BASE_DIR

    loads, probes = [], []
    monkeypatch.setattr(grpolab.stages.train, "load_model", lambda path, dtype: loads.append(path) or load_model(path, dtype))
    probe = grpolab.trainer.tracin.GradientProbe
    monkeypatch.setattr(grpolab.trainer.tracin, "GradientProbe", lambda model: probes.append(probe(model)) or probes[-1])
    params = config.apply_overrides(["train.steps=3", "train.loss.kl_beta=0.1", "model.lora.r=4", "model.lora.alpha=8",
                                     "model.lora.target_modules=[q_proj, v_proj, up_proj]", "train.optim.learning_rate=0.01",
                                     "train.mitigation.name=entropy_weighted", *SAME_BATCH])
    run_stage("train", params)
    assert loads == [BASE_DIR]
    [probe] = probes
    assert probe.params and all(".lora_A." in n or ".lora_B." in n for n in probe.params)
    assert {n.split(".")[-4] for n in probe.params} == {"q_proj", "v_proj", "up_proj"}  # ….q_proj.lora_A.default.weight

    curve = pd.read_csv(CURVE_FILE)
    # LoRA's B starts at 0: at step 1 the policy is the base model exactly, so the KL to the reference is 0
    assert curve["train/kl"].iloc[0] == 0 and curve["train/kl"].iloc[-1] > 0
    assert curve["tracin/selected_ratio"].notna().all()
    base = load_model(BASE_DIR).state_dict()
    merged = trained_weights()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.split(".")[-2] in {"q_proj", "v_proj", "up_proj"} for k in changed)
    assert (TRAINED_DIR / ADAPTER_DIR / "adapter_config.json").is_file()
    # the adapter applied to the base model by PEFT itself gives the merged model
    rebuilt = PeftModel.from_pretrained(load_model(BASE_DIR), TRAINED_DIR / ADAPTER_DIR).merge_and_unload().state_dict()
    for key, value in merged.items():
        torch.testing.assert_close(rebuilt[key], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", [
    pytest.param(["train.loss.policy.name=gspo", "train.ppo_epochs=2", "train.mia_weighting.use_mia_weighted_loss=true",
                  "train.mitigation.name=entropy_weighted"], id="gspo-mia-credit-ppo_epochs"),
    pytest.param(["train.loss.policy.name=cispo", "train.loss.advantage_estimator=rloo", "train.loss.entropy_coef=0.01", *SAME_BATCH], id="cispo-rloo-entropy-tracin"),
    pytest.param(["train.loss.advantage_estimator=opo", "train.rewards.overlong_buffer.enable=true", "train.rewards.overlong_buffer.len=8", "train.loss.mask_truncated_completions=true",
                  "model.lora.r=4", "model.lora.alpha=8"], id="opo-overlong-truncation-lora"),
])
def test_the_grpo_family_composes_with_mia_credit_tracin_lora_and_ppo_epochs(trainer, variant):
    run_stage("train", config.apply_overrides(["train.steps=2", *variant]))
    client = mlflow_client()
    run = train_runs(client)[0]
    curve = pd.read_csv(CURVE_FILE)
    assert curve["step"].tolist() == [1, 2] and np.isfinite(curve["train/loss"]).all()
    if "train.loss.policy.name=gspo" in variant:  # on-policy at step 1 every sequence ratio is exactly 1: nothing clipped
        assert client.get_metric_history(run.info.run_id, "train/clip_ratio")[0].value == 0
    if "train.rewards.overlong_buffer.len=8" in variant:
        penalties = [m.value for m in client.get_metric_history(run.info.run_id, "train/reward/overlong")]
        assert len(penalties) == 2 and all(-1 <= p <= 0 for p in penalties)
    if SAME_BATCH[0] in variant:
        assert "tracin/selected_ratio" in run.data.metrics



def test_dynamic_sampling_drops_tied_groups_and_samples_more_batches(trainer):
    from grpolab.paths import WEIGHTED_TRAIN_FILE
    from grpolab.stages.train import EXTRA_BATCHES, step_prompts

    params = config.apply_overrides(["train.steps=2", *tied_reward(Path(".")), "train.dynamic_sampling.enable=true", "train.dynamic_sampling.max_rollout_batches=6",
                                     "train.log.log_completions_every=1"])
    run_stage("train", params)
    client = mlflow_client()
    run = train_runs(client)[0]
    curve = pd.read_csv(CURVE_FILE)
    data = pd.read_parquet(WEIGHTED_TRAIN_FILE)
    tied = data["ground_truth"].astype(int) % 2 == 0
    more = False
    for step in (1, 2):
        at = curve.loc[curve["step"] == step].iloc[0]
        batches, dropped = int(at["train/rollout_batches"]), int(at["train/groups_dropped"])
        assert [m.value for m in client.get_metric_history(run.info.run_id, "train/rollout_batches")][step - 1] == batches
        sampled = [i for j in range(batches) for i in step_prompts(params, len(data), step - 1 + j * EXTRA_BATCHES)]
        # a first batch with a tied prompt lacks a group with signal: a second batch was sampled
        assert batches >= 2 or not tied[sampled[:4]].any()
        more |= batches >= 2
        assert tied[sampled].sum() <= dropped <= batches * 4 - 4
        # the cap was not reached: every trained group has signal
        assert client.get_metric_history(run.info.run_id, "train/frac_zero_std_groups")[step - 1].value == 0
        table = pd.read_json(client.download_artifacts(run.info.run_id, f"completions/step_{step:06d}.json", "."), orient="split")
        trained = table["prompt"].iloc[::4].tolist()
        assert len(trained) == 4 and set(trained) <= set(data["prompt"].iloc[sampled][~tied[sampled].to_numpy()])
        assert (table.groupby("prompt")["reward"].nunique() > 1).all()
    assert more  # here step 1's first batch had a tied group


def test_rng_states_round_trip_through_a_checkpoints_json():
    from grpolab.trainer.checkpoints import rng_state, set_rng_state

    state = json.loads(json.dumps(rng_state()))  # as the checkpoint's state file holds it
    assert ("cuda" in state) == torch.cuda.is_available()
    devices = ["cpu", *([f"cuda:{i}" for i in range(torch.cuda.device_count())])]
    drawn = [torch.rand(4, device=d) for d in devices]
    set_rng_state(state, "test")
    assert all(torch.equal(torch.rand(4, device=d), x) for d, x in zip(devices, drawn))
    set_rng_state({"cpu": state["cpu"]}, "test")  # written without CUDA: the CPU's restored all the same
    assert torch.equal(torch.rand(4), drawn[0])


@pytest.mark.timeout(300)
def test_deterministic_changes_nothing_on_cpu(trainer, tmp_path):
    """train.deterministic turns torch's deterministic kernels on (with TracIn's index_add_ in the step): on the
    CPU, where runs repeat anyway, the same model bit for bit."""
    plain = tmp_path / "plain"
    shutil.copytree(trainer, plain)
    overrides = ["train.steps=2", *SAME_BATCH]
    with working_in(plain):
        run_stage("train", config.apply_overrides(overrides))
    had_cublas = "CUBLAS_WORKSPACE_CONFIG" in os.environ
    try:
        run_stage("train", config.apply_overrides([*overrides, "train.deterministic=true"]))
        assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        if not had_cublas:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    other = load_model(plain / TRAINED_DIR).state_dict()
    assert all(torch.equal(other[k], v) for k, v in trained_weights().items())
    pd.testing.assert_frame_equal(pd.read_csv(CURVE_FILE).drop(columns=TIMINGS), pd.read_csv(plain / CURVE_FILE).drop(columns=TIMINGS),
                                  check_exact=True)


def test_cycles_and_epochs_sample_and_checkpoint_at_the_steps_of_the_per_step_rule():
    """The loop's PPO cycles (fresh rollouts at a cycle's first step, a checkpoint only after a whole cycle) hold
    the rule the loop stated step by step: rollouts at step s when (s - 1) % ppo_epochs == 0 or s follows the
    resumed step; a checkpoint after s when s % save_every == 0, s % ppo_epochs == 0 and s < steps."""
    from grpolab.stages.train import checkpoint_due, cycle_steps, cycles

    for epochs in (1, 2, 3):
        for steps in range(1, 8):
            for save_every in (0, 1, 2, 3):
                params = config.validate({"train": {"ppo_epochs": epochs, "steps": steps, "save_every": save_every}})
                saved = {s for s in range(1, steps + 1) if save_every and s % save_every == 0 and s % epochs == 0 and s < steps}
                for start in {0} | saved:  # from scratch, or resumed from any checkpoint
                    ran, sampled, checkpoints = [], [], set()
                    for cycle in cycles(params, start):
                        sampled.append(cycle_steps(params, cycle, start)[0])
                        ran += list(cycle_steps(params, cycle, start))
                        checkpoints |= {ran[-1]} if checkpoint_due(params, cycle, ran[-1]) else set()
                    assert ran == list(range(start + 1, steps + 1))
                    assert sampled == [s for s in ran if (s - 1) % epochs == 0 or s == start + 1]
                    assert checkpoints == {s for s in saved if s > start}, (epochs, steps, save_every, start)


def test_dealt_groups_are_each_process_share_of_the_chosen_groups_where_its_sampler_left_them(monkeypatch):
    """Two processes sampled two batches of 4 groups (2 rows each), each process 2 groups of each batch; of the chosen
    groups 1, 2 (batch 0) and 5, 6 (batch 1) each process gets two, from the share (rank-major: process, batch) holding each."""
    from grpolab.runtime import distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    everyone = [(0, slice(2, 4)), (0, slice(4, 6)), (1, slice(2, 4)), (1, slice(4, 6))]
    monkeypatch.setenv("RANK", "0")
    assert dist.deal_groups([1, 2, 5, 6], 2, 4, 2) == ([(0, slice(2, 4)), (2, slice(0, 2))], everyone)
    monkeypatch.setenv("RANK", "1")
    assert dist.deal_groups([1, 2, 5, 6], 2, 4, 2) == ([(1, slice(2, 4)), (3, slice(0, 2))], everyone)
