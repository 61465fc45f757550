"""The GPU check: what only a GPU can show about grpolab's GPU path, in one run of a few minutes on one GPU,
its figures written as JSON (after every section, so a run cut short keeps what it measured).

  a. versions, device, and grpolab's collectives in the process group as a GPU run initialises it
     (`cpu:gloo,cuda:nccl`), called with the CPU and CUDA tensors the trainer passes them;
  b. 3 GRPO steps (the trainer's own `make_batch` and `update`) with gradient checkpointing on, a Qwen2.5-0.5B-
     shaped model in bf16 (random weights from its config, saved and loaded as a user's checkpoint): step 1's KL
     (the reference loaded as the policy is: exactly 0), the policy's and reference's buffer dtypes, peak memory;
  c. rollout tokens/s of `samplers.hf.sample` against `model.generate` at 128 and 512 rows x 256 new tokens, peak memory;
  d. one GRPO update (`train.update`) at micro-batch 8, 16 and 32: time, tokens/s, peak memory, and model FLOPs
     utilisation against the H200's 790 TFLOP/s bf16;
  e. TracIn's same-batch influence pass: peak memory, per token of a chunk;
  f. 2 processes (`torchrun --nproc_per_node 2`; skipped on one GPU): 2 GRPO steps at ZeRO-1, 2 and 3, whose ranks
     decode different lengths (rank 0's prompts stop at once, rank 1's run every new token): per stage, whether it
     finished, its time, each rank's decode length and losses, and else its error (a stage that hangs is stopped after
     a timeout, its ranks' stacks recorded; the other stages still run).

    PYTHONPATH=src python bench/gpu_check.py --out gpu_check.json       # on a GPU machine (see docs/guide/gpu.md)
    python bench/gpu_check.py --tiny --out /tmp/gpu_check.json           # tiny shapes on CPU (the test suite runs it)

It needs torch, transformers, numpy, pandas, pyarrow, tqdm, and the wheels `make gpu-wheels` builds (DeepSpeed built
with its ops off, pydantic with its typing_extensions, ruamel.yaml); not MLflow, Prefect, DVC or the rest of grpolab's
stack (tests/test_gpu_check.py runs it so, in a fresh virtual environment).
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # grpolab from source when not installed

from common import EOS_ID, PAD_ID, byte_prompts, byte_tokenizer, make_batch, qwen2_config  # noqa: E402

PEAK_BF16_FLOPS = 790e12  # an H200's dense bf16 matmul rate, measured (DESIGN.md)
REWARD = '''import zlib


def compute_score(data_source, completion, ground_truth, extra_info):
    return float(zlib.crc32(completion.encode()) % 2)
'''
FULL = {"shape": "qwen2.5-0.5b", "vocab": 151_936, "prompt": 128, "steps_rows": 64, "steps_new": 256,
        "rollout_rows": [128, 512], "rollout_new": 256, "rollout_blocks": 2, "update_rows": 64, "update_new": 512,
        "micro_batches": [8, 16, 32], "tracin_rows": 32, "tracin_new": 256, "tracin_micro_batch": 8,
        "procs_shape": "qwen2.5-0.5b", "procs_rows": 32, "procs_new": 64, "procs_micro_batch": 8, "procs_timeout": 300}
TINY = {"shape": "tiny", "vocab": 1024, "prompt": 8, "steps_rows": 8, "steps_new": 8,
        "rollout_rows": [4, 8], "rollout_new": 8, "rollout_blocks": 1, "update_rows": 8, "update_new": 8,
        "micro_batches": [2, 4], "tracin_rows": 8, "tracin_new": 8, "tracin_micro_batch": 4,
        "procs_shape": "tiny", "procs_rows": 16, "procs_new": 8, "procs_micro_batch": 4, "procs_timeout": 120}
PROCESSES = 2
STOP = "!"  # a prompt ending in it makes section f's checkpoint say EOS at once (byte_prompts never contain it)


class Check:
    """The device's memory counters and clock, and the JSON report."""

    def __init__(self, out: Path, tiny: bool):
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.out = out
        self.report: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "tiny": tiny}

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def allocated_gb(self) -> float | None:
        return self.torch.cuda.memory_allocated() / 2**30 if self.cuda else None

    def section(self, name: str, fn) -> None:
        began = time.perf_counter()
        try:
            self.report[name] = fn()
        except Exception as exc:  # one section failing must not cost the others' figures
            self.report[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
        self.report[name]["seconds"] = round(time.perf_counter() - began, 2)
        self.out.write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        print(f"{name}: {json.dumps(self.report[name], default=str)[:1500]}", flush=True)


def versions_and_collectives(check: Check) -> dict:
    import deepspeed
    import torch
    import transformers

    from grpolab.runtime import distributed as dist
    from grpolab.runtime.device import device
    from grpolab.trainer.tracin import _reduced

    dist.init()
    here = device()
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "deepspeed": deepspeed.__version__, "device": str(here),
            "backend": torch.distributed.get_backend_config()}
    if check.cuda:
        props = torch.cuda.get_device_properties(here)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}",
                    gpus=torch.cuda.device_count())
    calls = {  # what the trainer passes each helper (CPU tensors), and on a GPU TracIn's CUDA gradients
        "all_gather_cat(rewards float32, cpu)": lambda: dist.all_gather_cat(torch.tensor([0.5, 1.0])).tolist() == [0.5, 1.0],
        "all_gather_cat(influence float64, cpu)": lambda: dist.all_gather_cat(torch.tensor([2.0], dtype=torch.float64)).item() == 2.0,
        "all_reduce_sum(sums float64, cpu)": lambda: dist.all_reduce_sum(torch.tensor([1.0, 2.0], dtype=torch.float64)).tolist() == [1.0, 2.0],
        "all_reduce_sum(units float32, cpu)": lambda: dist.all_reduce_sum(torch.tensor(3.0)).item() == 3.0,
        "all_gather_objects(data sources)": lambda: dist.all_gather_objects(["openai/gsm8k"]) == ["openai/gsm8k"],
        f"all_reduce_sum(gradient, {here.type})": lambda: bool(dist.all_reduce_sum(torch.ones(1024, device=here)).eq(1).all()),
        "TracIn _reduced (one process: as is)": lambda: bool(_reduced({"w": torch.ones(4, device=here)})["w"].eq(1).all()),
        "barrier": lambda: dist.barrier() is None,
    }
    results = {}
    for name, call in calls.items():
        try:
            results[name] = "ok" if call() else "wrong result"
        except Exception as exc:
            results[name] = f"{type(exc).__name__}: {exc}"
    return {**info, "collectives": results, "collectives_ok": all(v == "ok" for v in results.values())}


def _workspace(cfg: dict, root: Path, dtype) -> tuple[Path, object]:
    """A user's checkpoint of the shape (random weights, in the working dtype) with a tokenizer of as many ids."""
    import torch
    from transformers import AutoModelForCausalLM

    from grpolab.runtime.device import device

    checkpoint = root / "checkpoint"
    torch.manual_seed(0)
    with torch.device(device()):  # random init of 0.5B parameters is seconds on a GPU, a minute on its CPU
        AutoModelForCausalLM.from_config(qwen2_config(cfg["shape"], cfg["vocab"]), dtype=dtype).save_pretrained(checkpoint)
    tokenizer = byte_tokenizer(cfg["vocab"])
    tokenizer.save_pretrained(checkpoint)
    (root / "reward.py").write_text(REWARD)
    return checkpoint, tokenizer


def _params(root: Path, rows: int, new_tokens: int, micro_batch: int, **train):
    from grpolab import config

    return config.validate({
        "seed": 0,
        "train": {"steps": 3, "prompts_per_step": rows // 8, "group_size": 8, "micro_batch_size": micro_batch,
                  "max_new_tokens": new_tokens, "loss": {"kl_beta": 0.04}, "optim": {"warmup_steps": 0, "learning_rate": 1e-6},
                  "rewards": {"reward_file": str(root / "reward.py"), "weights": {"reward_file": 1.0}}, **train},
    })


def _engine(params, checkpoint: Path, dtype):
    import torch

    from grpolab.models import load_model
    from grpolab.trainer.engine import build_engine, deepspeed_config

    return build_engine(params, load_model(checkpoint, dtype), deepspeed_config(params, dtype == torch.bfloat16))


def _train_data(cfg: dict, rows: int, ending: str = ""):
    import pandas as pd

    return pd.DataFrame({"prompt": [p[: len(p) - len(ending)] + ending for p in byte_prompts(rows, cfg["prompt"])], "ground_truth": ["0"] * rows,
                         "data_source": ["bench"] * rows, "extra_info": [{"split": "train", "index": i} for i in range(rows)]})


def steps_with_checkpointing(check: Check, cfg: dict, root: Path, checkpoint: Path, tokenizer, dtype) -> dict:
    from grpolab.models import load_model
    from grpolab.rewards import Rewarder
    from grpolab.trainer.update import update
    from grpolab.trainer.loss_weights import LossWeighting

    params = _params(root, cfg["steps_rows"], cfg["steps_new"], micro_batch=cfg["steps_rows"] // 2, gradient_checkpointing=True)
    check.reset_peak()
    engine = _engine(params, checkpoint, dtype)
    reference = load_model(checkpoint, dtype).eval().requires_grad_(False)
    buffers = lambda m: {n: str(b.dtype) for n, b in m.named_buffers()}  # noqa: E731
    data = _train_data(cfg, cfg["steps_rows"])
    rewarder, variants = Rewarder(params), LossWeighting(params, data, tokenizer)
    steps = []
    for step in range(1, 4):
        check.sync()
        began = time.perf_counter()
        batch, _ = make_batch(params, engine, reference, tokenizer, data, rewarder, variants, step - 1)
        check.sync()
        sampled = time.perf_counter()
        sums = update(params, engine, batch)
        check.sync()
        steps.append({"step": step, "kl": sums["kl"] / sums["tokens"], "loss": sums["loss"], "grad_norm": sums["grad_norm"],
                      "completion_tokens": int(sums["tokens"]), "rollout_and_reference_s": round(sampled - began, 3),
                      "update_s": round(time.perf_counter() - sampled, 3)})
    result = {"rows": cfg["steps_rows"], "new_tokens": cfg["steps_new"], "steps": steps,
              "step1_kl": steps[0]["kl"], "step1_kl_is_0": steps[0]["kl"] == 0.0,
              "buffers_match": buffers(engine.module) == buffers(reference), "buffer_dtypes": sorted(set(buffers(reference).values())),
              "peak_memory_gb": check.peak_gb()}
    del engine, reference
    return result


def rollouts(check: Check, cfg: dict, checkpoint: Path, dtype) -> dict:
    from grpolab.models import load_model

    from bench_rollout import make_prompts, measure, summary

    model = load_model(checkpoint, dtype).eval()
    out = {}
    for rows in cfg["rollout_rows"]:
        check.reset_peak()
        rates = measure(model, make_prompts(rows, 64, cfg["vocab"]), cfg["rollout_new"], cfg["rollout_blocks"], rollout_batch_size=rows)
        out[f"{rows}_rows"] = {**summary(rates), "per_block": rates, "new_tokens": cfg["rollout_new"],
                               "peak_memory_gb": check.peak_gb()}
    del model
    return out


def model_flops_per_token(config, context: float) -> float:
    """Training FLOPs per token: 3 x the forward's 2 x (every matmul weight, the output head included) plus
    attention's 4 x layers x hidden x the average context a token attends to."""
    hidden, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads * hidden // config.num_attention_heads
    matmul = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter) + hidden * config.vocab_size
    return 3 * (2 * matmul + 4 * layers * hidden * context)


def updates(check: Check, cfg: dict, root: Path, checkpoint: Path, tokenizer, dtype) -> dict:
    import torch
    from transformers import AutoConfig

    from grpolab.algos.credit import OTHER
    from grpolab.models import load_model
    from grpolab.samplers import Rollout, left_pad
    from grpolab.trainer.update import Batch, batch_logprobs, update
    from grpolab.trainer.loss_weights import LossWeights

    rows, new = cfg["update_rows"], cfg["update_new"]
    g = torch.Generator().manual_seed(0)
    prompt_ids, prompt_mask = left_pad([torch.randint(10, cfg["vocab"], (cfg["prompt"],), generator=g).tolist()] * rows, PAD_ID)
    completion = torch.randint(10, cfg["vocab"], (rows, new), generator=g)  # no EOS: every row runs all T tokens
    rollout = Rollout(prompt_ids, prompt_mask, completion, torch.ones(rows, new, dtype=torch.long))
    advantages = torch.randn(rows, generator=g)
    reference = load_model(checkpoint, dtype).eval()
    flops = model_flops_per_token(AutoConfig.from_pretrained(checkpoint), (cfg["prompt"] + new) / 2)
    out = {"rows": rows, "prompt_tokens": cfg["prompt"], "new_tokens": new, "peak_flops": PEAK_BF16_FLOPS}
    for micro in cfg["micro_batches"]:
        params = _params(root, rows, new, micro)
        try:
            check.reset_peak()
            engine = _engine(params, checkpoint, dtype)
            weights = LossWeights(torch.ones(rows, new), torch.ones(rows), torch.ones(rows))
            batch = Batch(rollout, advantages, None, None, weights, torch.full((rows, new), OTHER))
            batch.ref_logp = batch_logprobs(reference, batch, micro, 1.0)
            times = []
            for _ in range(3):  # the first warms up kernels and the allocator
                check.sync()
                began = time.perf_counter()
                update(params, engine, batch)
                check.sync()
                times.append(time.perf_counter() - began)
            seconds = sorted(times[1:])[len(times[1:]) // 2]
            tokens = rows * (cfg["prompt"] + new)
            out[f"micro_batch_{micro}"] = {"seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds),
                                           "mfu": round(flops * tokens / seconds / PEAK_BF16_FLOPS, 4),
                                           "peak_memory_gb": check.peak_gb()}
        except torch.OutOfMemoryError as exc:
            out[f"micro_batch_{micro}"] = {"error": f"out of memory: {exc}"[:500]}
        finally:
            engine = batch = None
    return out


def tracin_memory(check: Check, cfg: dict, root: Path, checkpoint: Path, tokenizer, dtype) -> dict:
    import torch

    from grpolab.algos.credit import OTHER
    from grpolab.rewards import Rewarder
    from grpolab.samplers import Rollout, left_pad, make_sampler
    from grpolab.trainer.tracin import TracIn
    from grpolab.trainer.update import Batch, Sampled
    from grpolab.trainer.loss_weights import LossWeights

    rows, new, micro = cfg["tracin_rows"], cfg["tracin_new"], cfg["tracin_micro_batch"]
    params = _params(root, rows, new, micro, tracin={"use_tracin": True, "validation": {"name": "same_batch"}})
    engine = _engine(params, checkpoint, dtype)
    g = torch.Generator().manual_seed(1)
    prompt_ids, prompt_mask = left_pad([torch.randint(10, cfg["vocab"], (cfg["prompt"],), generator=g).tolist()] * rows, PAD_ID)
    completion = torch.randint(10, cfg["vocab"], (rows, new), generator=g)
    rollout = Rollout(prompt_ids, prompt_mask, completion, torch.ones(rows, new, dtype=torch.long))
    rewards = (torch.arange(rows) % 2).float()
    advantages = rewards - 0.5
    batch = Batch(rollout, advantages, None, None, LossWeights(torch.ones(rows, new), torch.ones(rows), torch.ones(rows)),
                  torch.full((rows, new), OTHER))
    sampled = Sampled([{"prompt": "p"}] * rows, ["c"] * rows, rewards, {}, rewards, ["bench"] * rows, torch.full((rows,), new))
    tracin = TracIn(params, engine.module, tokenizer, Rewarder(params), make_sampler("hf", engine.module, tokenizer, batch_size=rows))
    check.reset_peak()
    before = check.allocated_gb()
    check.sync()
    began = time.perf_counter()
    selection = tracin.select(engine.module, batch, sampled, rollout_index=0, step=1)
    check.sync()
    seconds = time.perf_counter() - began
    chunk_tokens = micro * (cfg["prompt"] + new)
    peak = check.peak_gb()
    return {"rows": rows, "micro_batch": micro, "chunk_tokens": chunk_tokens, "seconds": round(seconds, 3),
            "selected_ratio": selection.metrics["tracin/selected_ratio"], "peak_memory_gb": peak,
            "peak_over_start_gb": None if peak is None else peak - before,
            "mb_per_chunk_token": None if peak is None else round((peak - before) * 1024 / chunk_tokens, 3)}


def _stopping_checkpoint(cfg: dict, root: Path, dtype) -> Path:
    """Section f's checkpoint: after a prompt that ends in STOP its first token is EOS, after any other EOS is as
    unlikely as any token. The layers' output projections are zeroed, so the last hidden state is the last token's
    embedding; hidden unit 0 belongs to STOP's and EOS's embeddings alone, so only STOP's scores EOS (by 10 x sqrt
    hidden) and no other token's does. Ranks given such prompts and others decode 1 and max_new_tokens tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from grpolab.runtime.device import device

    checkpoint = root / "stopping"
    torch.manual_seed(0)
    with torch.device(device()), torch.no_grad():
        model = AutoModelForCausalLM.from_config(qwen2_config(cfg["procs_shape"], cfg["vocab"]), dtype=dtype)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embedding = model.get_input_embeddings().weight  # tied: also the output head
        stop = byte_tokenizer(cfg["vocab"]).convert_tokens_to_ids(STOP)
        embedding[:, 0] = 0
        embedding[[stop, EOS_ID]] = 0
        embedding[stop, 0], embedding[EOS_ID, 0] = 1.0, 10.0
        model.save_pretrained(checkpoint)
    byte_tokenizer(cfg["vocab"]).save_pretrained(checkpoint)
    return checkpoint


def zero_stages(check: Check, cfg: dict, root: Path, dtype, tiny: bool) -> dict:
    """f: each ZeRO stage's 2 steps in its own torchrun, so a stage that fails or hangs costs only its own result."""
    import torch

    if check.cuda and torch.cuda.device_count() < PROCESSES:
        return {"skipped": f"{torch.cuda.device_count()} GPU: the {PROCESSES}-process section needs {PROCESSES}"}
    _stopping_checkpoint(cfg, root, dtype)
    env = {"GLOO_SOCKET_IFNAME": "lo", **os.environ}  # one node: gloo on the loopback, not the first interface it resolves
    out: dict = {"processes": PROCESSES, "rows": cfg["procs_rows"], "new_tokens": cfg["procs_new"], "shape": cfg["procs_shape"]}
    for stage in (1, 2, 3):
        log, began = root / f"zero{stage}.log", time.perf_counter()
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(PROCESSES),
                   __file__, "--zero-worker", str(stage), "--workdir", str(root), *(["--tiny"] if tiny else [])]
        with open(log, "w") as sink:
            launcher = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
            try:
                error = None if launcher.wait(timeout=cfg["procs_timeout"]) == 0 else f"torchrun exited {launcher.returncode}"
            except subprocess.TimeoutExpired:
                error = f"hung: stopped after {cfg['procs_timeout']} s"
                _stop(launcher, root.glob(f"zero{stage}_rank*.pid"))
        ranks = [json.loads(p.read_text()) for p in sorted(root.glob(f"zero{stage}_rank*.json"))]
        out[f"zero_{stage}"] = {"finished": error is None and len(ranks) == PROCESSES,
                                "seconds": round(time.perf_counter() - began, 2), "ranks": ranks}
        if error is not None:
            stacks = {p.stem.split("_")[1]: p.read_text() for p in sorted(root.glob(f"zero{stage}_rank*.stack")) if p.stat().st_size}
            out[f"zero_{stage}"].update(error=error, stacks=stacks, log_tail=log.read_text()[-3000:])
    failed = [f"ZeRO-{s}: {out[f'zero_{s}'].get('error')}" for s in (1, 2, 3) if not out[f"zero_{s}"]["finished"]]
    return {**out, **({"error": "; ".join(failed)} if failed else {})}


def _stop(launcher: subprocess.Popen, pid_files) -> None:
    """torchrun stops its workers on SIGTERM (they run in sessions of their own); a worker still alive after is killed
    by the pid it wrote."""
    launcher.send_signal(signal.SIGTERM)
    try:
        launcher.wait(timeout=60)
    except subprocess.TimeoutExpired:
        launcher.kill()
        launcher.wait()
    for pid_file in pid_files:
        pid = int(pid_file.read_text())
        try:
            if b"--zero-worker" in Path(f"/proc/{pid}/cmdline").read_bytes():  # still that worker, not a reused pid
                os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass


def zero_worker(stage: int, root: Path, cfg: dict) -> None:
    """One rank of section f: 2 GRPO steps (the trainer's `make_batch` and `update`) at ZeRO `stage`; rank 0's
    prompts end in STOP, so the ranks decode different lengths. Writes its figures to root/zero{stage}_rank{rank}.json."""
    import torch

    from grpolab.runtime import distributed as dist
    from grpolab.data.tokenizer import load_tokenizer
    from grpolab.runtime.device import working_dtype
    from grpolab.models import load_model
    from grpolab.rewards import Rewarder
    from grpolab.trainer.update import update
    from grpolab.trainer.loss_weights import LossWeighting

    rank = int(os.environ["RANK"])
    (root / f"zero{stage}_rank{rank}.pid").write_text(str(os.getpid()))
    stack = open(root / f"zero{stage}_rank{rank}.stack", "w")  # open while the rank runs: a signal writes to it
    faulthandler.register(signal.SIGTERM, file=stack, all_threads=False, chain=True)  # a hung rank, stopped, says where
    dist.init()
    dtype, checkpoint = working_dtype("auto"), root / "stopping"
    params = _params(root, cfg["procs_rows"], cfg["procs_new"], cfg["procs_micro_batch"], steps=2,
                     num_processes=PROCESSES, deepspeed={"zero_stage": stage})
    engine = _engine(params, checkpoint, dtype)
    reference = load_model(checkpoint, dtype).eval().requires_grad_(False)
    tokenizer = load_tokenizer(str(checkpoint))
    data = _train_data(cfg, cfg["procs_rows"], STOP if rank == 0 else "")
    rewarder, variants = Rewarder(params), LossWeighting(params, data, tokenizer)
    steps = []
    for step in (1, 2):
        batch, _ = make_batch(params, engine, reference, tokenizer, data, rewarder, variants, step - 1)
        sums = update(params, engine, batch)
        steps.append({"step": step, "decoded": batch.rollout.completion_ids.shape[1],
                      "lengths": batch.rollout.completion_mask.sum(1).tolist(), "loss": sums["loss"]})
    (root / f"zero{stage}_rank{rank}.json").write_text(json.dumps({"rank": rank, "steps": steps}))
    dist.barrier()  # no rank leaves while another's collectives may still be in flight
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (runs on CPU in seconds)")
    parser.add_argument("--zero-worker", type=int, help=argparse.SUPPRESS)  # a rank of section f, as torchrun starts it
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    a = parser.parse_args()
    import torch

    from grpolab.runtime.device import working_dtype

    cfg = TINY if a.tiny else FULL
    if a.zero_worker is not None:
        return zero_worker(a.zero_worker, a.workdir, cfg)
    check = Check(a.out, a.tiny)
    dtype = working_dtype("auto")
    check.report["settings"] = {**cfg, "dtype": str(dtype)}
    check.section("a_versions_and_collectives", lambda: versions_and_collectives(check))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint, tokenizer = _workspace(cfg, root, dtype)
        check.section("b_steps_with_gradient_checkpointing", lambda: steps_with_checkpointing(check, cfg, root, checkpoint, tokenizer, dtype))
        check.section("c_rollouts", lambda: rollouts(check, cfg, checkpoint, dtype))
        check.section("d_updates", lambda: updates(check, cfg, root, checkpoint, tokenizer, dtype))
        check.section("e_tracin_same_batch", lambda: tracin_memory(check, cfg, root, checkpoint, tokenizer, dtype))
        check.section("f_zero_stages_2_processes", lambda: zero_stages(check, cfg, root, dtype, a.tiny))
    failed = [name for name, part in check.report.items() if isinstance(part, dict) and "error" in part]
    print(f"\n{a.out}: {'sections failed: ' + ', '.join(failed) if failed else 'every section ran'}"
          f"{'' if torch.cuda.is_available() else ' (CPU: no GPU figures)'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
