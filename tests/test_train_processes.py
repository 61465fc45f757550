"""The train stage as several processes, and killed and resumed (a real DeepSpeed engine on CPU, gloo)."""


import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytest
import torch

from grpolab import config
from grpolab.models import load_model
from grpolab.data.tokenizer import load_tokenizer
from grpolab.paths import CHECKPOINT_DIR, CURVE_FILE, TOKENIZER_DIR, TRAINED_DIR
from grpolab.stages.train import DYNAMIC_SAMPLING_KEYS

from conftest import BIN, grpolab, project_env
from training import (SAME_BATCH, SEPARATE, STEP_METRICS, TIMINGS, kill_after_a_checkpoint_and_later_steps, mlflow_client,
                      tied_reward, train_runs, trained_weights)


# The same run resumed (with TracIn, PPO cycles, dynamic sampling and CISPO: every step log), and plain GRPO
# resumed into a new run.
@pytest.mark.parametrize("case", ["dynamic_sampling_cispo_tracin_ppo_epochs", "eval_changed_run_deleted"])
def test_resume_after_a_kill_gives_an_uninterrupted_runs_outputs(trainer, tmp_path, case):
    variant = [*SAME_BATCH, "train.ppo_epochs=2", "train.dynamic_sampling.enable=true", "train.loss.policy.name=cispo", *tied_reward(trainer)] \
        if case != "eval_changed_run_deleted" else []
    overrides = ["train.steps=12", "train.save_every=3", "train.log.credit_log_every=1", "train.log.log_completions_every=1", *variant]
    reference = tmp_path / "reference"  # the same params trained in one go, in another copy
    shutil.copytree(trainer, reference)
    grpolab("stage", "train", *[f"-S{o}" for o in overrides], cwd=reference)

    config.apply_overrides(overrides)
    client = mlflow_client()
    killed_at = kill_after_a_checkpoint_and_later_steps(trainer, client)
    assert killed_at % (2 if variant else 1) == 0  # a checkpoint closes a PPO cycle
    assert not TRAINED_DIR.exists()
    (killed_run,) = train_runs(client)
    for output in (TRAINED_DIR, Path("metrics/credit"), Path("metrics/tracin"), CURVE_FILE):  # what `dvc repro` deletes
        shutil.rmtree(output, ignore_errors=True) if output.is_dir() else output.unlink(missing_ok=True)
    if case == "eval_changed_run_deleted":
        config.apply_overrides(["eval.num_samples=3"])  # eval.* does not make another model: the checkpoint stays
        client.delete_run(killed_run.info.run_id)

    proc = grpolab("stage", "train", cwd=trainer)
    assert f"train: resuming at step {killed_at} of 12 from {CHECKPOINT_DIR}/step_{killed_at:06d}" in proc.stdout
    (run,) = train_runs(client)
    assert run.info.status == "FINISHED" and f"MLflow run {run.info.run_id}" in proc.stdout
    if case == "eval_changed_run_deleted":
        assert run.info.run_id != killed_run.info.run_id
        assert f"the MLflow run {killed_run.info.run_id} of the checkpoint is gone" in proc.stderr
    else:
        assert run.info.run_id == killed_run.info.run_id
    keys = [k for k in STEP_METRICS if not k.startswith("train/reward/")] + ["train/reward/reward_file", *DYNAMIC_SAMPLING_KEYS] \
        if variant else STEP_METRICS
    for key in keys:  # each step once: a list, not a set, so a duplicate would show
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(range(1, 13)), key
    # a new run holds the completion tables of the steps after the resume only (the lost run had the others)
    for step in (killed_at + 1, 12) if case == "eval_changed_run_deleted" else (1, killed_at + 1, 12):
        table = pd.read_json(client.download_artifacts(run.info.run_id, f"completions/step_{step:06d}.json", str(tmp_path)), orient="split")
        assert len(table) == 16, step

    expected, curve = pd.read_csv(reference / CURVE_FILE), pd.read_csv(CURVE_FILE)
    assert curve["step"].tolist() == list(range(1, 13))
    pd.testing.assert_frame_equal(curve.drop(columns=TIMINGS), expected.drop(columns=TIMINGS), rtol=1e-5)
    for folder in ["metrics/credit", *(["metrics/tracin"] if variant else [])]:
        logs = sorted(Path(folder).glob("step_*.parquet"))
        assert [p.name for p in logs] == sorted(p.name for p in (reference / folder).glob("step_*.parquet")), folder
        assert len(logs) == (6 if folder == "metrics/tracin" else 12)  # TracIn logs once per PPO cycle
        for log in logs:
            pd.testing.assert_frame_equal(pd.read_parquet(log), pd.read_parquet(reference / folder / log.name), rtol=1e-5)
    expected = load_model(reference / TRAINED_DIR).state_dict()
    for key, value in trained_weights().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)
    assert not CHECKPOINT_DIR.exists()


def test_the_checkpoint_fingerprint_covers_train_params_seed_base_model_and_train_data(trainer):
    from grpolab.trainer.checkpoints import fingerprint
    from grpolab.stages.train import train_inputs

    params = config.load()
    inputs = train_inputs(params)
    same = fingerprint(params, inputs)
    assert fingerprint(config.apply_overrides(["eval.num_samples=7", "mia.k=0.3", "tracking.run_name=x"]), inputs) == same
    for change in ("train.optim.learning_rate=0.5", "seed=3", "train.mitigation.name=entropy_masking", "model.dtype=bfloat16",
                   "model.lora.r=4"):
        assert fingerprint(config.overridden([change])[1], inputs) != same, change
    weights = Path("models/base/model.safetensors")
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))  # a new base model, same params
    assert fingerprint(params, inputs) != same
    data = Path("data/train_weighted.parquet")
    before = fingerprint(params, inputs)
    pd.read_parquet(data).iloc[:-1].to_parquet(data)
    assert fingerprint(params, inputs) != before


def test_the_fingerprint_is_hashed_once_until_an_input_changes_and_another_base_model_is_not_resumed(trainer, capsys):
    from grpolab.trainer.checkpoints import STATE_FILE, fingerprint, resumable
    from grpolab.stages.train import train_inputs

    params = config.load()
    inputs = train_inputs(params)
    time.sleep(1.1)  # the fixture's copies were just written: a stamp less than a second old is not trusted
    key = fingerprint(params, inputs)
    (CHECKPOINT_DIR / "step_000002").mkdir(parents=True)  # what a killed training leaves
    (CHECKPOINT_DIR / "step_000002" / STATE_FILE).write_text(json.dumps({"step": 2, "fingerprint": key, "mlflow_run_id": None}))
    (CHECKPOINT_DIR / "latest").write_text("step_000002")
    assert resumable(fingerprint(params, inputs)).step == 2
    assert capsys.readouterr().out.count("train: rank 0 hashed models/base, data/train_weighted.parquet, judge") == 1
    weights = Path("models/base/model.safetensors")
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))  # same size, same inode
    assert resumable(fingerprint(params, inputs)) is None
    assert capsys.readouterr().out.count("hashed") == 1


# An MLflow artifact-repository plugin (an entry point of a distribution on PYTHONPATH): a local folder behind a
# slow link, where uploading a folder (the trained model) takes SLOW_STORE_DELAY_S seconds more.
SLOW_STORE = """import os, time
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

class SlowArtifactRepository(LocalArtifactRepository):
    def __init__(self, artifact_uri, *args, **kwargs):
        super().__init__("file" + artifact_uri.removeprefix("slowfile"), *args, **kwargs)

    def log_artifacts(self, local_dir, artifact_path=None):
        time.sleep(float(os.environ["SLOW_STORE_DELAY_S"]))
        super().log_artifacts(local_dir, artifact_path)
"""


@pytest.mark.timeout(600)  # a rank stuck in a collective
def test_two_processes_hash_the_inputs_once_and_outlast_an_upload_longer_than_the_group_timeout(trainer, tmp_path, monkeypatch):
    plugin = tmp_path / "plugin"
    (plugin / "slow_store-0.dist-info").mkdir(parents=True)
    (plugin / "slow_store.py").write_text(SLOW_STORE)
    (plugin / "slow_store-0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: slow-store\nVersion: 0\n")
    (plugin / "slow_store-0.dist-info" / "entry_points.txt").write_text(
        "[mlflow.artifact_repository]\nslowfile = slow_store:SlowArtifactRepository\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(plugin), *filter(None, [os.environ.get("PYTHONPATH")])]))
    store = tmp_path / "store"
    client = mlflow_client()
    experiment = client.create_experiment("slow", artifact_location=f"slowfile://{store}")
    # from 30 minutes; 15 s was once too short for an ordinary collective on a loaded machine
    monkeypatch.setenv("GRPOLAB_PROCESS_GROUP_TIMEOUT_S", "30")
    monkeypatch.setenv("SLOW_STORE_DELAY_S", "40")
    began = time.monotonic()
    proc = grpolab("stage", "train", *[f"-S{o}" for o in ["train.num_processes=2", "train.micro_batch_size=4", "tracking.experiment=slow"]],
                   cwd=trainer)
    assert time.monotonic() - began > 40
    (run,) = client.search_runs([experiment], "tags.`grpolab.stage` = 'train'")
    assert run.info.status == "FINISHED"
    uploaded = Path(urlparse(run.info.artifact_uri).path) / "trained_model"
    assert (uploaded / "model.safetensors").read_bytes() == (TRAINED_DIR / "model.safetensors").read_bytes()
    assert not CHECKPOINT_DIR.exists()
    # rank 0 hashed the base model and data once (for the MLflow run to resume, and the training's broadcast);
    # rank 1 received it, and the checkpoint at step 2 did not hash again
    assert proc.stdout.count("hashed") == 1 and "train: rank 0 hashed models/base" in proc.stdout


def _two_nodes(project: Path, log: Path) -> None:
    """`grpolab stage train` on 2 simulated nodes x 1 process: two torchrun invocations with `--nnodes 2`
    that meet at a c10d rendezvous endpoint, as a cluster's nodes meet at their head node's. The endpoint
    is a TCPStore this test binds on port 0 and holds (a head node's torchrun would host it on its
    --rdzv-endpoint port); the process group's own store is the one torchrun's rank 0 binds on port 0."""
    endpoint = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = {**project_env(), "GLOO_SOCKET_IFNAME": "lo"}
    with open(log, "w") as out:
        nodes = [subprocess.Popen([f"{BIN}/torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{endpoint.port}", "--rdzv-id", "two-nodes",
                                   "--rdzv-conf", "is_host=false", "--local-addr", "127.0.0.1", "--max-restarts", "0",
                                   "-m", "grpolab.cli", "stage", "train"], cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
                 for node in (0, 1)]
        codes = [node.wait(timeout=600) for node in nodes]
    assert codes == [0, 0], log.read_text()[-5000:]


def test_two_processes_and_two_nodes_follow_one_process_trajectory(trainer, tmp_path):
    single, nodes = tmp_path / "single", tmp_path / "nodes"
    shutil.copytree(trainer, single)
    shutil.copytree(trainer, nodes)
    grpolab("stage", "train", "-S", "train.steps=4", cwd=single)
    two_processes = ["-S", "train.num_processes=2", "-S", "train.micro_batch_size=4"]
    proc = grpolab("stage", "train", *two_processes, cwd=trainer)
    config.apply_overrides(["train.num_processes=2", "train.micro_batch_size=4"], nodes / "params.yaml")
    _two_nodes(nodes, tmp_path / "torchrun.log")
    # both launchers' workers joined the group as a GPU run does (env://, a backend per device type: on a GPU
    # cpu:gloo,cuda:nccl), and every collective helper ran in it with the trainer's own tensors
    for output in (proc.stdout, (tmp_path / "torchrun.log").read_text()):
        assert "train: 2 processes on cpu, process group cpu:gloo, float32, ZeRO-0" in output
    one = pd.read_csv(single / CURVE_FILE)
    # Same global batch, same completions (per-row sampling seeds), gradients averaged over ranks:
    # the trajectories agree to float32 reduction-order noise, whoever launched the processes.
    for two in (pd.read_csv(trainer / CURVE_FILE), pd.read_csv(nodes / CURVE_FILE)):
        for column in ("train/reward_mean", "train/loss", "train/kl", "train/entropy"):
            torch.testing.assert_close(torch.tensor(two[column].values), torch.tensor(one[column].values), rtol=1e-4, atol=1e-5, msg=column)
    # rank 0 alone logged: one train run in the store, its steps once each
    client = mlflow_client(nodes)
    runs = train_runs(client)
    assert len(runs) == 1 and [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] == [1, 2, 3, 4]
    # a launched world that is not train.num_processes is refused before any work
    config.apply_overrides(["train.num_processes=1", "train.micro_batch_size=8"], nodes / "params.yaml")
    with pytest.raises(AssertionError, match="train.num_processes is 1 but the launcher started 2 processes"):
        _two_nodes(nodes, tmp_path / "torchrun.log")




# With the GRPO family: under dynamic sampling two processes keep the same groups as one.
# zero3: every parameter partitioned (ZeRO-3 gathers each for every module call, a collective), ranks whose rows
# decode different lengths, head chunks of 16 tokens (a different number per rank), TracIn chunks skipping rows
# of advantage 0, reference log-probs: every loop whose length differs between ranks. A hang fails at the timeout.
@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", ["same_batch", "separate", "zero3"])
def test_tracin_and_the_grpo_family_two_processes_give_one_process_keep_masks(trainer, tmp_path, mode):
    overrides = {
        "same_batch": [*SAME_BATCH, "train.loss.policy.name=cispo", "train.loss.advantage_estimator=rloo", "train.loss.entropy_coef=0.01"],
        "separate": [*SEPARATE, "train.loss.policy.name=gspo", "train.dynamic_sampling.enable=true", *tied_reward(trainer),
                     "train.rewards.overlong_buffer.enable=true", "train.rewards.overlong_buffer.len=8", "train.loss.mask_truncated_completions=true"],
        "zero3": [*SAME_BATCH, "train.loss.kl_beta=0.05", "model.logit_chunk_tokens=16", "train.max_new_tokens=56"],
    }[mode]
    processes = ["train.num_processes=2", "train.micro_batch_size=4"] + (
        ["train.deepspeed.zero_stage=3", "train.deepspeed.stage3_param_persistence_threshold=0"] if mode == "zero3" else [])
    single = tmp_path / "single"
    shutil.copytree(trainer, single)
    grpolab("stage", "train", *[f"-S{o}" for o in ["train.steps=3", *overrides]], cwd=single)
    proc = grpolab("stage", "train", *[f"-S{o}" for o in ["train.steps=3", *overrides, *processes]], cwd=trainer)
    if mode == "zero3":
        assert "ZeRO-3" in proc.stdout
        tokenizer = load_tokenizer(str(trainer / TOKENIZER_DIR))
        longest = []  # per step, each rank's longest completion: how many steps its decode loop ran
        for step in (1, 2, 3):
            completions = pd.read_parquet(trainer / f"metrics/tracin/step_{step:06d}.parquet")["completion"].tolist()
            half = len(completions) // 2  # rank-major
            longest.append([max(len(tokenizer.encode(c)) for c in part) for part in (completions[:half], completions[half:])])
        assert any(a != b for a, b in longest), longest
    for step in (1, 2, 3):
        one = pd.read_parquet(single / f"metrics/tracin/step_{step:06d}.parquet")
        two = pd.read_parquet(trainer / f"metrics/tracin/step_{step:06d}.parquet")
        assert one["kept"].tolist() == two["kept"].tolist() and one["completion"].tolist() == two["completion"].tolist()
        torch.testing.assert_close(torch.tensor(two["influence"].values), torch.tensor(one["influence"].values), rtol=1e-3, atol=1e-7)
    one, two = pd.read_csv(single / CURVE_FILE), pd.read_csv(trainer / CURVE_FILE)
    for column in ("train/reward_mean", "train/loss", "train/kl", "tracin/val_grad_norm", "tracin/mean_ip"):
        torch.testing.assert_close(torch.tensor(two[column].values), torch.tensor(one[column].values), rtol=1e-4, atol=1e-5, msg=column)
    if mode == "separate":
        assert one["train/rollout_batches"].tolist() == two["train/rollout_batches"].tolist() and one["train/rollout_batches"].max() >= 2
        assert one["train/groups_dropped"].tolist() == two["train/groups_dropped"].tolist()




RANK1_RAISES = """import os
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    if os.environ["RANK"] == "1":  # rank 1's rows: rank 0 is then waiting for it in a collective
        return {}["nope"]
    return 0.0
"""


@pytest.mark.timeout(600)
def test_a_user_error_in_one_of_two_processes_is_one_line_named_by_either_launcher(trainer, tmp_path):
    """A reward file that raises in rank 1 only: grpolab's launcher prints the named error once, as its last line,
    with no traceback of any rank, exit 2; torchrun's own summary names it too."""
    (trainer / "bad_reward.py").write_text(RANK1_RAISES)
    overrides = ["train.rewards.reward_file=bad_reward.py", "train.rewards.weights={reward_file: 1.0}", "train.rewards.judge_model=null",
                 "train.num_processes=2", "train.micro_batch_size=4"]
    named = "grpolab: error: train.rewards.reward_file: bad_reward.py: compute_score raised KeyError: 'nope' on data/train_weighted.parquet: row "
    proc = grpolab("stage", "train", *[f"-S{o}" for o in overrides], cwd=trainer, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and proc.stderr.rstrip().splitlines()[-1].startswith(named), output[-3000:]
    assert output.count("grpolab: error:") == 1 and "Traceback" not in output, output[-3000:]

    endpoint = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    torchrun = subprocess.run([f"{BIN}/torchrun", "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", f"127.0.0.1:{endpoint.port}", "--rdzv-conf", "is_host=false", "--local-addr", "127.0.0.1",
                               "--max-restarts", "0", "-m", "grpolab.cli", "stage", "train"], cwd=trainer,
                              env={**project_env(), "GLOO_SOCKET_IFNAME": "lo"}, capture_output=True, text=True, timeout=500)
    output = torchrun.stdout + torchrun.stderr
    # rank 1 printed nothing (rank 0 prints a user's error, the others leave it to torchrun): torchrun's summary shows it
    assert torchrun.returncode != 0 and f"traceback : {named}" in output and output.count(named) == 1, output[-5000:]
