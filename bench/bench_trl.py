"""grpolab's GRPO trainer vs TRL's GRPOTrainer, side by side in one run.

Same base model (models/base), same train prompts, group size, prompts per step, max new
tokens, KL beta, loss aggregation, learning rate, rewards (answer match + 0.1 format), one
optimizer step per batch of rollouts, one micro-batch per step. Each block trains both from the
base model (`--steps` steps, the first `--warmup` not timed), in an order that alternates from
block to block (grpolab, TRL; then TRL, grpolab; ...), so drift of the machine lands on both
sides. Prints each block's steps/s and completion tokens/s and their ratio, and the median and
spread (min, max) of the ratio over the blocks.

    make bench            # installs trl (once) and runs this from the project root
    python bench/bench_trl.py --blocks 5 --steps 22 --warmup 2

Needs `make run` (or `dvc repro sft`) first, for models/base and data/train.parquet.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from common import alternate, block_order, markdown_table, spread

AGG_TO_TRL = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}
ROOT = Path.cwd()


def bench_grpolab(a) -> tuple[float, float]:
    from grpolab import config
    from grpolab.paths import CURVE_FILE
    from grpolab.stages.train import train

    with tempfile.TemporaryDirectory() as tmp:
        for name in ("data", "models/base"):
            shutil.copytree(ROOT / name, Path(tmp) / name)
        shutil.copy(ROOT / "params.yaml", Path(tmp) / "params.yaml")
        os.chdir(tmp)
        try:
            batch = a.prompts * a.group
            params = config.apply_overrides([
                f"train.steps={a.steps}", f"train.prompts_per_step={a.prompts}", f"train.group_size={a.group}",
                f"train.max_new_tokens={a.max_new_tokens}", f"train.loss.kl_beta={a.beta}", f"train.loss.loss_agg_mode={a.loss_agg}",
                f"train.micro_batch_size={batch}", f"train.optim.learning_rate={a.lr}", "train.save_every=0",
                "train.rewards.weights={answer_match: 1.0, format: 0.1}", "train.temperature=1.0", "train.top_p=1.0",
            ])
            train(params)
            curve = pd.read_csv(CURVE_FILE)
            timed = curve.iloc[a.warmup :]
            seconds = float(timed["train/step_time"].sum())
            tokens = float((timed["train/completion_length"] * batch).sum())
            return len(timed) / seconds, tokens / seconds
        finally:
            os.chdir(ROOT)


def bench_trl(a) -> tuple[float, float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpolab.data.tokenizer import load_tokenizer
    from grpolab.models import load_model
    from grpolab.rewards import answer_match, format_reward

    def answer_reward(prompts, completions, ground_truth, **_):
        return [answer_match(c, g) for c, g in zip(completions, ground_truth)]

    def format_bonus(prompts, completions, ground_truth, **_):
        return [0.1 * format_reward(c, g) for c, g in zip(completions, ground_truth)]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.lengths, self._start = [], [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self._start)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])

    data = pd.read_parquet(ROOT / "data/train.parquet")
    dataset = Dataset.from_dict({"prompt": data["prompt"].tolist(), "ground_truth": data["ground_truth"].tolist()})
    tokenizer = load_tokenizer(str(ROOT / "models/base"))
    timer = Timer()
    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(
            output_dir=tmp, max_steps=a.steps, per_device_train_batch_size=a.prompts * a.group,
            num_generations=a.group, max_completion_length=a.max_new_tokens, beta=a.beta,
            loss_type=AGG_TO_TRL[a.loss_agg], learning_rate=a.lr, temperature=1.0, top_p=1.0,
            gradient_accumulation_steps=1, num_iterations=1, use_cpu=True, bf16=False, report_to="none",
            logging_steps=1, save_strategy="no", seed=0, lr_scheduler_type="cosine", warmup_steps=0,
            reward_weights=[1.0, 1.0], log_completions=False,
        )
        trainer = GRPOTrainer(model=load_model(ROOT / "models/base"), reward_funcs=[answer_reward, format_bonus],
                              args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
        trainer.train()
    times, lengths = timer.times[a.warmup :], timer.lengths[a.warmup :]
    seconds = sum(times)
    return len(times) / seconds, sum(l * a.prompts * a.group for l in lengths) / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=5, help="blocks of the two trainers, alternating which goes first")
    p.add_argument("--steps", type=int, default=22)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--loss-agg", default="token-mean", choices=sorted(AGG_TO_TRL))
    p.add_argument("--lr", type=float, default=2e-4)
    a = p.parse_args()

    def contender(name, bench):
        def run(block: int) -> tuple[float, float]:
            print(f"==> block {block + 1}/{a.blocks}: {name}", file=sys.stderr, flush=True)
            return bench(a)
        return run

    got = alternate({"grpolab": contender("grpolab", bench_grpolab), "TRL": contender("TRL", bench_trl)}, a.blocks)
    ours, trl = got["grpolab"], got["TRL"]
    ratios = [[o[i] / t[i] for o, t in zip(ours, trl)] for i in (0, 1)]  # steps/s, tokens/s
    print(f"\nsame model, data, group={a.group}, prompts/step={a.prompts}, max_new_tokens={a.max_new_tokens}, "
          f"beta={a.beta}, loss_agg={a.loss_agg}; {a.steps - a.warmup} timed steps each, {a.blocks} blocks alternating the order")
    rows = [[b + 1, ", ".join(block_order(list(got), b)), f"{o[0]:.3f}", f"{t[0]:.3f}", f"{ratios[0][b]:.2f}x",
             f"{o[1]:.0f}", f"{t[1]:.0f}", f"{ratios[1][b]:.2f}x"] for b, (o, t) in enumerate(zip(ours, trl))]
    print(markdown_table(["block", "order", "grpolab steps/s", "TRL steps/s", "ratio",
                          "grpolab completion tok/s", "TRL completion tok/s", "ratio"], rows))
    print(f"ratio grpolab / TRL, median [min, max] over {a.blocks} blocks: steps/s {spread(ratios[0], fmt='{:.2f}')}x, "
          f"completion tokens/s {spread(ratios[1], fmt='{:.2f}')}x")


if __name__ == "__main__":
    main()
