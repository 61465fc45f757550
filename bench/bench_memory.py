"""Peak memory of every stage at Qwen2.5's vocabulary (151,936) and the everyday sequence lengths: an SFT step,
the mia stage's pass, a train step, a TracIn step and an eval pass, this revision against an earlier one (default:
6898a70, the commit before issue 30's micro-batched SFT and streamed TracIn captures), side by side.

The model is Qwen2-shaped but narrow (hidden 64, 2 layers, tied embeddings, random weights) so it runs on
a laptop's CPU; what grows with the shapes is what the issues are about: logits and log-softmax copies of
[rows, positions, vocabulary], and TracIn's captures. Each measurement is a fresh process (`python -m grpolab.cli
stage <stage>`, the revision's own source on PYTHONPATH) in a workspace of its own, its peak resident set
read from the kernel (wait4's ru_maxrss), so imports count alike for both (~0.8 GB). Prompts are P letters of
a byte-level tokenizer of as many ids (P tokens); a random model almost never says EOS, so completions run all T tokens;
SFT responses are T letters; the reward is a hash of the completion (`train.rewards.reward_file`), so advantages are not
0 and TracIn works. Knobs the earlier revision lacks are set for this revision only (NEW_KNOBS).

Blocks alternate which revision goes first; memory is nearly deterministic, one block shows it.

    python bench/bench_memory.py --blocks 1          # the table in docs/guide/gpu.md (~40 min on 2 cores)
    python bench/bench_memory.py --against HEAD~3 --blocks 1 --shapes 8x32x64
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from common import block_order, byte_prompts, byte_tokenizer, markdown_table, qwen2_config, spread

ROOT = Path(__file__).resolve().parents[1]
GROUP = 4
REWARD = '''import zlib


def compute_score(data_source, completion, ground_truth, extra_info):
    return (zlib.crc32(completion.encode()) % 7) / 6
'''
# name -> (stage, overrides); sft last: it writes models/base, which the others read
WORKLOADS = {
    "train step": ("train", []),
    "TracIn step": ("train", ["train.tracin.use_tracin=true"]),
    "eval pass": ("evaluate", []),
    "mia pass": ("mia", []),
    "SFT step": ("sft", []),
}
SFT_MICRO_BATCH = 2
NEW_KNOBS = {"sft.micro_batch_size": SFT_MICRO_BATCH}  # this revision's; the earlier one trains SFT in one pass


def source_tree(revision: str, into: Path) -> Path:
    """`src/` and `params.yaml` of a git revision ("" = the working tree) under `into`."""
    into.mkdir(parents=True)
    if not revision:
        shutil.copytree(ROOT / "src", into / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
        shutil.copy(ROOT / "params.yaml", into / "params.yaml")
        return into
    archive = subprocess.run(["git", "archive", revision, "src", "params.yaml"], cwd=ROOT, capture_output=True, check=True).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(into)
    return into


def build_base(path: Path, shape: str = "narrow") -> None:
    """A Qwen2-shaped model with the real vocabulary (`shape` of common.QWEN_SHAPES: by default a narrow body) and
    a byte-level tokenizer of as many ids."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(qwen2_config(shape, max_positions=1024)).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)


def write_data(data: Path, prompt_tokens: int, new_tokens: int, n_train: int = 16, n_eval: int = 8) -> None:
    import pandas as pd

    def rows(n: int, split: str, seed: int) -> pd.DataFrame:
        return pd.DataFrame({"prompt": byte_prompts(n, prompt_tokens, seed=seed), "ground_truth": ["0"] * n,
                             "data_source": ["bench"] * n, "extra_info": [{"split": split, "index": i} for i in range(n)]})
    data.mkdir(parents=True, exist_ok=True)
    rows(n_train, "train", 0).to_parquet(data / "train.parquet")
    rows(n_train, "train", 0).to_parquet(data / "train_weighted.parquet")
    rows(n_eval, "eval", 1).to_parquet(data / "eval.parquet")
    rows(n_eval, "val", 4).to_parquet(data / "val.parquet")  # a TracIn run's checkpoint fingerprint covers it
    pd.DataFrame({"prompt": byte_prompts(n_train, prompt_tokens, seed=2), "response": byte_prompts(n_train, new_tokens, seed=3)}
                 ).to_parquet(data / "sft.parquet")


def overrides(rows: int, prompt_tokens: int, new_tokens: int) -> dict[str, object]:
    return {
        "train.steps": 1, "train.prompts_per_step": rows // GROUP, "train.group_size": GROUP, "train.micro_batch_size": rows,
        "train.max_new_tokens": new_tokens, "train.save_every": 0, "train.log.credit_log_every": 0, "train.optim.warmup_steps": 0,
        "train.rewards.reward_file": "reward.py", "train.rewards.weights": {"reward_file": 1.0},
        "eval.max_new_tokens": new_tokens, "eval.num_samples": 1, "eval.batch_size": rows, "eval.num_logged_samples": 0,
        "mia.max_new_tokens": new_tokens, "mia.batch_size": rows, "mia.method": "min_k_plus_plus",
        "sft.steps": 1, "sft.batch_size": rows, "sft.warmup_steps": 0, "model.name_or_path": "models/user",
    }


def write_params(tree: Path, workspace: Path, settings: dict[str, object]) -> None:
    from ruamel.yaml import YAML

    yaml = YAML()
    params = yaml.load((tree / "params.yaml").read_text())
    for key, value in settings.items():
        node = params
        *sections, last = key.split(".")
        for section in sections:
            node = node[section]
        node[last] = value
    with open(workspace / "params.yaml", "w") as out:
        yaml.dump(params, out)


def peak_rss_mb(tree: Path, workspace: Path, stage: str, extra: list[str]) -> float:
    """Run `grpolab stage <stage>` of the revision in `tree` in `workspace`; its peak resident set in MB."""
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}}
    env.update(PYTHONPATH=str(tree / "src"), MLFLOW_DISABLE_TELEMETRY="true", TOKENIZERS_PARALLELISM="false")
    args = [sys.executable, "-m", "grpolab.cli", "stage", stage, *[f"-S{o}" for o in extra]]
    with open(workspace / f"{stage}.log", "w") as log:
        proc = subprocess.Popen(args, cwd=workspace, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{args} in {workspace} failed:\n{(workspace / f'{stage}.log').read_text()[-3000:]}")
    return usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default="6898a70", help="the earlier revision (a git commit)")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", default=["8x32x64", "8x128x256", "8x128x512", "16x128x512"],
                        help="ROWSxPxT: rows per step (= micro-batch), prompt tokens, completion tokens")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    a = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    trees = {a.against: source_tree(a.against, scratch / "old"), "this revision": source_tree("", scratch / "new")}
    base = scratch / "base"
    build_base(base)
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes]
    results: dict[tuple, list[float]] = {}
    for block in range(a.blocks):
        for shape in shapes:
            for name in block_order(list(trees), block):
                workspace = scratch / f"run-{block}-{'x'.join(map(str, shape))}-{'old' if name == a.against else 'new'}"
                (workspace / "models").mkdir(parents=True)
                shutil.copytree(base, workspace / "models/base")
                shutil.copytree(base, workspace / "models/user")  # the checkpoint SFT starts from
                shutil.copytree(base, workspace / "data/tokenizer")
                write_data(workspace / "data", shape[1], shape[2])
                (workspace / "reward.py").write_text(REWARD)
                write_params(trees[name], workspace, overrides(*shape) | (NEW_KNOBS if name == "this revision" else {}))
                for workload, (stage, extra) in ((w, WORKLOADS[w]) for w in WORKLOADS if w in a.workloads):
                    mb = peak_rss_mb(trees[name], workspace, stage, extra)
                    results.setdefault((workload, shape, name), []).append(mb)
                    print(f"block {block + 1}: {name:>13}  {workload:<12} rows {shape[0]:>3}  P {shape[1]:>4}  T {shape[2]:>4}: "
                          f"{mb:8.0f} MB", flush=True)
                shutil.rmtree(workspace)
    rows = []
    for workload in [w for w in WORKLOADS if w in a.workloads]:
        for shape in shapes:
            old, new = results[(workload, shape, a.against)], results[(workload, shape, "this revision")]
            rows.append([workload, *shape, spread(old, fmt="{:.0f}"), spread(new, fmt="{:.0f}"),
                         f"{sorted(o / n for o, n in zip(old, new))[len(old) // 2]:.2f}x"])
    print()
    print(markdown_table(["workload", "rows", "P", "T", f"{a.against} peak RSS, MB", "this revision, MB", "ratio"], rows))
    if a.json:
        a.json.write_text(json.dumps([{"workload": w, "shape": s, "revision": r, "peak_rss_mb": v}
                                      for (w, s, r), v in results.items()], indent=1))
    shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
