"""Host time of one GRPO train step under cProfile, this revision against an earlier one (default: 6898a70, before
issue 30's hot-loop work), at two shapes:

- `default`: params.yaml as it is (16 prompts x 8 completions = 128 rows, 48 new tokens, the tiny Llama of
  vocabulary 512 after a short SFT, so completions carry their `<think>`/`<answer>` tags);
- `qwen`: 128 rows (16 x 8) of a Qwen2-shaped model with the real vocabulary (151,936) and a narrow body (hidden 64,
  2 layers; bench_memory's `build_base`), 32-token prompts; a random model runs all 48 new tokens.

Each measurement is a fresh process running the revision's own source (`PYTHONPATH`) in a workspace of its own: the
train stage's setup, one warm-up step, then `--steps` steps of the loop body of `stages/train.py` (sample, score,
weigh, update, metrics, record; `train.log.credit_log_every=1`, so each step writes its credit log), each step under its
own `cProfile.Profile` timed by the process's CPU time (one torch thread, `OMP_NUM_THREADS=1`: a busy machine's other
processes count in the wall time only). Reported per step, medians over every step of every block: the wall time, the
CPU time, the interpreter's own time (cProfile's tottime of Python functions, builtins and torch's C++ calls left out:
the per-token and per-row Python), the cumulative time of the functions issue 30 names, and the number of host reads
of a tensor (`.item()`, `.tolist()`). Blocks alternate which revision goes first.

    python bench/bench_host.py                         # ~25 min on 2 cores
    python bench/bench_host.py --shapes qwen --steps 2 --blocks 1 --json host.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import REWARD, build_base, source_tree, write_data, write_params  # noqa: E402
from common import block_order, markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMMON = {"train.log.credit_log_every": 1, "train.save_every": 0, "train.log.log_completions_every": 10**6}
SHAPES = {
    "default": {},
    "qwen": {"train.rewards.reward_file": "reward.py", "train.rewards.weights": {"reward_file": 1.0}},
}
# the functions issue 30 names: label -> (file suffix, name) pairs whose cumulative times add up ("~": a builtin,
# matched by a part of its name)
TARGETS = {
    "token classes": [("grpolab/trainer/loss_weights.py", "token_classes")],
    "rows of the data (iloc / take + to_dict)": [("pandas/core/indexing.py", "__getitem__"), ("pandas/core/frame.py", "to_dict"),
                                                 ("pandas/core/generic.py", "take")],
    "gradient norms (norm / _foreach_norm)": [("~", "'norm' of"), ("~", "_foreach_norm"), ("~", "vector_norm")],
    "credit_log": [("grpolab/trainer/update.py", "credit_log")],
    "Recorder.step": [("grpolab/trainer/recorder.py", "step")],
    "score (rewards)": [("stages/train.py", "score")],
    "weigh": [("stages/train.py", "weigh")],
    "update": [("grpolab/trainer/update.py", "update")],
    "step_metrics": [("grpolab/trainer/update.py", "step_metrics")],
    "sample_rollouts": [("stages/train.py", "sample_rollouts")],
}
READS = ("'item' of", "'tolist' of")  # host reads of a tensor: counted (calls), not timed


def matches(key: tuple, pairs: list[tuple[str, str]]) -> bool:
    file, _, name = key
    return any(file == "~" and fn in name if suffix == "~" else file.endswith(suffix) and name == fn for suffix, fn in pairs)


def setup(workspace: Path, shape: str, tree: Path) -> None:
    """The workspace of a shape: params.yaml, models/base, data/train_weighted.parquet."""
    workspace.mkdir(parents=True)
    write_params(tree, workspace, COMMON | SHAPES[shape])
    if shape == "qwen":
        build_base(workspace / "models/base")
        write_data(workspace / "data", prompt_tokens=32)
        (workspace / "reward.py").write_text(REWARD)
        return
    for stage, extra in (("prepare", []), ("sft", ["-Ssft.steps=120", "-Ssft.warmup_steps=10"])):
        run([sys.executable, "-m", "grpolab.cli", "stage", stage, *extra], workspace, tree)
    shutil.copy(workspace / "data/train.parquet", workspace / "data/train_weighted.parquet")  # no MIA weights needed


def run(args: list[str], workspace: Path, tree: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}}
    env.update(PYTHONPATH=str(tree / "src"), MLFLOW_DISABLE_TELEMETRY="true", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run(args, cwd=workspace, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{args} in {workspace} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def worker(steps: int, out: Path) -> None:
    """In the workspace (cwd), with the revision's grpolab on PYTHONPATH: the train stage's setup, a warm-up
    step, then `steps` profiled steps; their figures as JSON into `out`."""
    import pandas as pd
    import torch

    from grpolab import config
    from grpolab.runtime import distributed as dist
    from grpolab.data.tokenizer import load_tokenizer
    from grpolab.models import load_model
    from grpolab.paths import BASE_DIR, WEIGHTED_TRAIN_FILE
    from grpolab.trainer.recorder import Recorder
    from grpolab.rewards import Rewarder
    from grpolab.samplers import make_sampler
    from grpolab.stages import train as T
    from grpolab.trainer.update import step_metrics, update
    from grpolab.trainer.engine import build_engine, deepspeed_config
    from grpolab.trainer.loss_weights import LossWeighting

    params = config.load(Path("params.yaml"))
    t = params.train
    dist.init()
    torch.manual_seed(params.seed)
    tokenizer = load_tokenizer(str(BASE_DIR))
    model = load_model(BASE_DIR, torch.float32)
    ref_model = load_model(BASE_DIR, torch.float32).eval().requires_grad_(False) if t.loss.kl_beta > 0 else None
    data = pd.read_parquet(WEIGHTED_TRAIN_FILE)
    rewarder = Rewarder(params)
    sampler = make_sampler(t.rollout.backend, model, tokenizer, batch_size=t.rollout_batch_size, settings=t.rollout,
                           model_dir=BASE_DIR, seed=params.seed)
    engine = build_engine(params, model, deepspeed_config(params, False))
    variants = LossWeighting(params, data, tokenizer)
    record = Recorder(params, None, variants, [])
    run = T.Training(params, engine, tokenizer, data, rewarder, sampler, variants, ref_model, None, record, "", False)

    def step(n: int) -> None:  # the loop body of stages/train.py's train()
        began = time.perf_counter()
        sampler.sync(engine.module)
        sampled, rollout, _ = T.sample_scored(run, n - 1)
        batch = T.weigh(run, sampled, rollout)
        sampler.rest()
        sums = update(params, engine, batch)
        metrics = step_metrics(params, engine, sums, sampled, batch, time.perf_counter() - began)
        record.step(n, metrics, batch, sampled, None)

    step(1)
    figures = []
    for n in range(2, steps + 2):
        profile = cProfile.Profile(time.process_time)  # this process's CPU time: a busy machine's other processes do not count
        began = time.perf_counter()
        profile.enable()
        step(n)
        profile.disable()
        wall = time.perf_counter() - began
        stats = pstats.Stats(profile).stats  # (file, line, name) -> (calls, primitive calls, tottime, cumtime, callers)
        figures.append({
            "wall": wall,
            "cpu": sum(tt for (_, _, tt, _, _) in stats.values()),
            "python": sum(tt for (file, _, _), (_, _, tt, _, _) in stats.items() if file != "~"),
            "targets": {label: sum(ct for key, (_, _, _, ct, _) in stats.items() if matches(key, pairs)) for label, pairs in TARGETS.items()},
            "reads": sum(calls for (file, _, name), (calls, *_) in stats.items() if file == "~" and any(r in name for r in READS)),
            "top": sorted(([f"{Path(file).name}:{line}({name})", tt] for (file, line, name), (_, _, tt, _, _) in stats.items()),
                          key=lambda x: -x[1])[:15],
        })
    getattr(record, "flush", lambda: None)()  # a revision that writes its step logs in the background
    out.write_text(json.dumps(figures))


def median(values: list[float], scale: float = 1000.0) -> str:
    return f"{statistics.median(values) * scale:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default="6898a70", help="the earlier revision (a git commit)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per process (after one warm-up step)")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write every step's figures here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        return worker(a.steps, a.worker)
    scratch = Path(tempfile.mkdtemp(prefix="bench_host_"))
    trees = {a.against: source_tree(a.against, scratch / "old"), "this revision": source_tree("", scratch / "new")}
    results: dict[tuple[str, str], list[dict]] = {}
    for shape in a.shapes:
        base = scratch / f"base-{shape}"
        setup(base, shape, trees[a.against])  # its params.yaml: the older schema knows fewer keys
        for block in range(a.blocks):
            for name in block_order(list(trees), block):
                workspace = scratch / f"run-{shape}-{block}-{'old' if name == a.against else 'new'}"
                shutil.copytree(base, workspace)
                out = workspace / "figures.json"
                run([sys.executable, str(Path(__file__).resolve()), "--worker", str(out), "--steps", str(a.steps)], workspace, trees[name])
                figures = json.loads(out.read_text())
                results.setdefault((shape, name), []).extend(figures)
                print(f"block {block + 1}: {name:>13}  {shape:<8} wall/step {median([f['wall'] for f in figures])} ms, "
                      f"Python {median([f['python'] for f in figures])} ms", flush=True)
                shutil.rmtree(workspace)
    for shape in a.shapes:
        old, new = results[(shape, a.against)], results[(shape, "this revision")]
        rows = [["wall", median([f["wall"] for f in old]), median([f["wall"] for f in new])],
                ["CPU time of the process", median([f["cpu"] for f in old]), median([f["cpu"] for f in new])],
                ["Python (tottime of Python functions)", median([f["python"] for f in old]), median([f["python"] for f in new])]]
        rows += [[label, median([f["targets"][label] for f in old]), median([f["targets"][label] for f in new])] for label in TARGETS]
        rows.append(["host reads of a tensor (.item / .tolist calls)", median([f["reads"] for f in old], 1), median([f["reads"] for f in new], 1)])
        print(f"\n{shape}: ms per step, median of {len(old)} steps\n")
        print(markdown_table(["", a.against, "this revision"], rows))
        for name, figures in ((a.against, old), ("this revision", new)):
            top: dict[str, list[float]] = {}
            for f in figures:
                for fn, tt in f["top"]:
                    top.setdefault(fn, []).append(tt)
            ranked = sorted(top.items(), key=lambda kv: -sum(kv[1]) / len(figures))[:8]
            print(f"\n{shape}, {name}: top tottime (ms per step, mean)\n")
            print(markdown_table(["function", "ms"], [[fn, f"{sum(v) / len(figures) * 1000:.1f}"] for fn, v in ranked]))
    if a.json:
        a.json.write_text(json.dumps({f"{shape}|{name}": figures for (shape, name), figures in results.items()}, indent=1))
    shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
