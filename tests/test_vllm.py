"""Rollouts on vLLM (its CPU build, fp32) and the training log-probs under the sampling temperature: the
train stage end to end with `train.rollout.backend=vllm` on a real DeepSpeed engine and a tiny Llama whose
head size vLLM's CPU attention takes (32)."""

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from grpolab import config
from grpolab.errors import ConfigError
from grpolab.logprobs import completion_logprobs
from grpolab.models import load_model
from grpolab.paths import BASE_DIR, CURVE_FILE
from grpolab.samplers import sample_keys
from grpolab.samplers.hf import sample
from grpolab.stages import run_stage
from grpolab.trainer.update import SAMPLING_KEYS

from conftest import TINY, grpolab, make_project, run
from training import kill_after_a_checkpoint_and_later_steps, mlflow_client, train_runs, working_in

VLLM = ["train.rollout.backend=vllm", "train.rollout.vllm_kv_cache_gib=0.25"]
# head size 32 (hidden 64 / 2 heads): one that vLLM's CPU attention takes
SHAPE = ["model.hidden_size=64", "model.num_heads=2", "model.intermediate_size=128", "train.rewards.weights={answer_match: 1.0}"]


@pytest.fixture(scope="module")
def vllm_base(tmp_path_factory):
    """prepare + sft + mia once, with the hf backend, shared read-only by the tests below."""
    root = tmp_path_factory.mktemp("vllm-base")
    shutil.copy(Path(__file__).parents[1] / "params.yaml", root / "params.yaml")
    with working_in(root):
        params = config.apply_overrides([*TINY, *SHAPE])
        for stage in ("prepare", "sft", "mia"):
            run_stage(stage, params)
    return root


@pytest.fixture
def project(vllm_base, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "p"
    shutil.copytree(vllm_base, root)
    monkeypatch.chdir(root)
    return root


def test_training_logprobs_are_the_sampling_distributions(project):
    """At temperature 0.7 the trainer's log-probs are those of softmax(logits / 0.7), the distribution the rollouts
    were drawn from: equal to the decoder's own sampling log-probs, so step 1's ratio to them is 1."""
    model = load_model(BASE_DIR).eval()
    prompts = [[5, 6, 7, 8], [9, 10, 11]] * 4
    rollout = sample(model, prompts, max_new_tokens=12, eos_ids=[2], pad_id=0, temperature=0.7,
                     keys=sample_keys(0, list(range(len(prompts)))))
    trainer_logp = completion_logprobs(model, rollout, temperature=0.7)[0]
    with torch.no_grad():  # by hand: one forward over [prompt | completion], log-softmax of logits / 0.7
        ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
        mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        p = rollout.prompt_ids.shape[1]
        by_hand = torch.log_softmax(logits[:, p - 1 : -1].float() / 0.7, -1).gather(-1, rollout.completion_ids[..., None])[..., 0]
    valid = rollout.completion_mask.bool()
    torch.testing.assert_close(trainer_logp[valid], by_hand[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout.token_logp[valid], by_hand[valid], atol=1e-5, rtol=0)

    params = config.apply_overrides(["train.steps=1", "train.temperature=0.7"])
    run_stage("train", params)
    curve = pd.read_csv(CURVE_FILE)  # hf: the mismatch is logged to MLflow, not in the curve
    assert "sampling/importance_sampling_ratio/max" not in curve
    metrics = train_runs(mlflow_client())[0].data.metrics
    assert metrics["sampling/sampling_logp_difference/max"] < 1e-5
    assert abs(metrics["sampling/importance_sampling_ratio/max"] - 1) < 1e-5


def _watch_sync(monkeypatch) -> list[bool]:
    """Before each sampled batch of rollouts, whether the vLLM engine's greedy completions equal the policy's own
    (the hf decoder over the module last synced), bit for bit."""
    from grpolab.samplers import vllm

    checks: list[bool] = []
    sync, sample_ = vllm.VLLMSampler.sync, vllm.VLLMSampler.sample

    def synced(self, model):
        self.policy = model
        return sync(self, model)

    def sampled(self, prompts, **kwargs):
        if kwargs.get("keys") is not None:
            engine = sample_(self, prompts, max_new_tokens=kwargs["max_new_tokens"])
            policy = sample(self.policy, prompts, max_new_tokens=kwargs["max_new_tokens"], eos_ids=self.eos_ids, pad_id=self.pad_id)
            checks.append(torch.equal(engine.completion_ids, policy.completion_ids))
        return sample_(self, prompts, **kwargs)

    monkeypatch.setattr(vllm.VLLMSampler, "sync", synced)
    monkeypatch.setattr(vllm.VLLMSampler, "sample", sampled)
    return checks


@pytest.mark.parametrize("setting", [[], ["model.lora.r=4", "model.lora.alpha=8"], ["train.deepspeed.zero_stage=3"]],
                         ids=["full", "lora", "zero3"])
def test_vllm_holds_the_policys_weights_before_every_batch(project, monkeypatch, setting):
    checks = _watch_sync(monkeypatch)
    params = config.apply_overrides([*VLLM, "train.steps=4", "train.optim.learning_rate=0.01", *setting])
    run_stage("train", params)
    assert checks == [True] * 4  # steps 1-4: the weights after 0, 1, 2 and 3 updates
    curve = pd.read_csv(CURVE_FILE)
    assert set(SAMPLING_KEYS) <= set(curve)
    # fp32 on the CPU: vLLM's and the trainer's log-probs agree, and the correction changes nothing measurable
    assert (curve["sampling/sampling_logp_difference/max"] < 1e-4).all()
    assert (curve["sampling/importance_sampling_ratio/min"] > 1 - 1e-4).all()
    assert (curve["sampling/importance_sampling_ratio/max"] < 1 + 1e-4).all()
    assert (curve["sampling/importance_sampling_ratio/bounded_share"] == 0).all()


def test_tied_embeddings_stay_tied_through_a_push(tmp_path):
    """A Qwen2 with tied embeddings (as Qwen2.5-0.5B): after a push of changed embeddings the engine's sampling
    log-probs are the changed model's, so its output head follows the embeddings (on the CPU vLLM kept a packed
    copy of the old head until the sampler packs it again)."""
    import mlflow.server  # noqa: F401  Flask's context-bound proxies in sys.modules, as in a worker that ran MLflow's server
    from transformers import AutoConfig, AutoModelForCausalLM

    from grpolab.samplers.vllm import VLLMSampler

    cfg = AutoConfig.for_model("qwen2", vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, intermediate_size=128, max_position_embeddings=64,
                               tie_word_embeddings=True, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(tmp_path / "m")
    settings = config.validate({"train": {"rollout": {"backend": "vllm", "vllm_kv_cache_gib": 0.25}}}).train.rollout
    engine = VLLMSampler(tmp_path / "m", cfg, eos_ids=[1], pad_id=0, settings=settings, seed=0, dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(torch.randn(96, 64, generator=torch.Generator().manual_seed(1)))
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    engine.sync(model)
    prompts = [[5 + i, 7, 9 + i % 5] for i in range(16)]
    pushed = engine.sample(prompts, max_new_tokens=12, keys=sample_keys(0, list(range(16))))
    engine.close()
    valid = pushed.completion_mask.bool()
    torch.testing.assert_close(pushed.token_logp[valid], completion_logprobs(model, pushed)[0][valid], atol=1e-4, rtol=0)


def test_vllm_runs_repeat_exactly(project, tmp_path):
    """Two trainings with the same params on vLLM: the same curve (but the wall-clock column), model and eval metrics."""
    params = config.apply_overrides([*VLLM, "train.steps=2", "train.mitigation.name=entropy_masking", "eval.mia_methods=[loss]"])
    run_stage("train", params)
    first = pd.read_csv(CURVE_FILE).drop(columns="train/step_time")
    first_eval = run_stage("evaluate", params)  # greedy and sampled completions on vLLM too
    shutil.copytree("models/trained", tmp_path / "first")
    run_stage("train", params)
    pd.testing.assert_frame_equal(pd.read_csv(CURVE_FILE).drop(columns="train/step_time"), first)
    assert run_stage("evaluate", params) == first_eval
    a, b = load_model(tmp_path / "first").state_dict(), load_model("models/trained").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("override, message", [
    (["model.hidden_size=48", "model.num_heads=2"], "head sizes"),
    (["train.rollout.vllm_kv_cache_gib=0.00001"], "train.rollout.vllm_kv_cache_gib"),
    (["train.rollout.vllm_enable_sleep_mode=true"], "train.rollout.vllm_enable_sleep_mode"),
])
def test_what_vllm_cannot_run_is_refused_before_work(project, override, message):
    """Each refusal names its param, exits 2, and leaves no output behind."""
    if override[0].startswith("model."):  # a base model of another shape, saved where the stage reads it
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(BASE_DIR)
        cfg.hidden_size, cfg.head_dim = 48, 24
        AutoModelForCausalLM.from_config(cfg).save_pretrained(BASE_DIR)
        override = []
    result = grpolab("stage", "train", *[f"-S{o}" for o in [*VLLM[:1], *override]], cwd=project, check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not Path("models/trained").exists() and not Path("checkpoints").exists()


def test_an_architecture_vllm_lacks_and_vllm_missing_are_named(project, monkeypatch):
    from transformers import AutoConfig

    from grpolab.samplers import vllm

    settings = config.apply_overrides(VLLM).train.rollout
    cfg = AutoConfig.from_pretrained(BASE_DIR)
    cfg.architectures = ["NoSuchForCausalLM"]
    with pytest.raises(ConfigError, match="does not implement the model's architecture"):
        vllm.check(cfg, settings, torch.float32, on_gpu=False)
    monkeypatch.setattr(vllm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="vLLM is not installed.*make install"):
        vllm.check(cfg, settings, torch.float32, on_gpu=False)


@pytest.mark.parametrize("variant", [
    ["train.tracin.use_tracin=true", "train.ppo_epochs=2", "train.loss.policy.name=cispo", "train.mitigation.name=entropy_weighted",
     "train.steps=4"],
    ["train.tracin.use_tracin=true", "train.tracin.validation.name=separate", "train.tracin.validation.val_batch_size=8",
     "train.tracin.validation.val_pool_size=16", "train.dynamic_sampling.enable=true", "train.loss.advantage_estimator=rloo",
     "train.mia_weighting.use_mia_weighted_loss=true", "train.rollout.vllm_importance_sampling_mode=sequence_mask", "train.steps=2"],
], ids=["same_batch-ppo_epochs-cispo-entropy", "separate-dynamic_sampling-rloo-mia"])
def test_the_variants_train_on_vllm_rollouts(project, variant):
    run_stage("train", config.apply_overrides([*VLLM, *variant]))
    curve = pd.read_csv(CURVE_FILE)
    assert curve["train/loss"].notna().all() and curve["tracin/selected_ratio"].notna().sum() == 2  # once per batch
    assert (curve["sampling/importance_sampling_ratio/max"] < 1 + 1e-4).all()
    assert len(list(Path("metrics/tracin").glob("step_*.parquet"))) == 2  # a batch of rollouts each


def test_a_killed_vllm_training_resumes_to_the_uninterrupted_curve(project, tmp_path):
    overrides = [*VLLM, "train.steps=6", "train.save_every=2"]
    reference = tmp_path / "reference"
    shutil.copytree(project, reference)
    grpolab("stage", "train", *[f"-S{o}" for o in overrides], cwd=reference)
    config.apply_overrides(overrides)
    killed_at = kill_after_a_checkpoint_and_later_steps(project, mlflow_client())
    Path(CURVE_FILE).unlink(missing_ok=True)
    proc = grpolab("stage", "train", cwd=project)
    assert f"train: resuming at step {killed_at} of 6" in proc.stdout
    pd.testing.assert_frame_equal(pd.read_csv(CURVE_FILE).drop(columns="train/step_time"),
                                  pd.read_csv(reference / CURVE_FILE).drop(columns="train/step_time"), rtol=1e-5)


def test_two_processes_each_with_its_engine_sample_one_process_groups(project, tmp_path):
    """train.num_processes=2 on vLLM: an engine per process, each row seeded by its place in the run, so the
    two processes' rollouts are one process's (the same rewards, step by step) and the losses agree."""
    one = tmp_path / "one"
    shutil.copytree(project, one)
    grpolab("stage", "train", *[f"-S{o}" for o in [*VLLM, "train.steps=3"]], cwd=one)
    proc = grpolab("stage", "train", *[f"-S{o}" for o in [*VLLM, "train.steps=3", "train.num_processes=2",
                                                          "train.micro_batch_size=4"]], cwd=project)
    assert "train: 2 processes on cpu" in proc.stdout
    single, two = pd.read_csv(one / CURVE_FILE), pd.read_csv(CURVE_FILE)
    assert two["train/reward_mean"].tolist() == single["train/reward_mean"].tolist()
    assert two["train/completion_length"].tolist() == single["train/completion_length"].tolist()
    torch.testing.assert_close(torch.tensor(two["train/loss"].values), torch.tensor(single["train/loss"].values), rtol=1e-4, atol=1e-5)


def test_the_pipeline_on_vllm_through_the_prefect_flow_and_dvc_tracked_in_mlflow(tmp_path):
    """`grpolab run` (the Prefect flow, a `dvc repro` per stage) with the vLLM backend: every stage that generates
    (mia, train, evaluate) on vLLM, the backend a param and a tag of every run, the mismatch in the train run and
    the parent's headline metrics, and DVC up to date afterwards."""
    project = make_project(tmp_path / "e2e")
    grpolab("run", *[f"-S{o}" for o in [*TINY, *SHAPE, *VLLM]], cwd=project)
    client = mlflow_client(project)
    runs = client.search_runs([client.get_experiment_by_name("grpolab").experiment_id])
    stages = {r.data.tags.get("grpolab.stage"): r for r in runs}
    assert {"pipeline", "prepare", "sft", "mia", "train", "evaluate"} <= set(stages)
    assert {r.data.tags["grpolab.rollout_backend"] for r in runs} == {"vllm"}
    assert stages["pipeline"].data.params["train.rollout.backend"] == "vllm"  # the parent holds the params
    assert abs(stages["train"].data.metrics["sampling/importance_sampling_ratio/mean"] - 1) < 1e-4
    assert "mean/sampling/sampling_logp_difference/mean" in stages["pipeline"].data.metrics
    assert "trained/success_rate" in stages["pipeline"].data.metrics
    assert run(["dvc", "status"], project).stdout.split() == ["inputs:", "always", "changed"]  # the rest up to date
