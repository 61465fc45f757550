"""LoRA against full fine-tuning: peak memory and time of a GRPO update on CPU, on a model built from config.

Each measurement is a fresh process (its peak RSS is the contender's own), built as the train stage
builds it: `models.with_lora`, the engine of `trainer.build_engine` (AdamW over the trainable parameters)
from `trainer.deepspeed_config`, and the KL reference (a second frozen copy for full fine-tuning, the
policy with its adapters disabled for LoRA). An update: the reference's log-probs, the policy's forward
and backward of a policy-gradient + KL loss on random tokens, and the optimizer step. The contenders
alternate in `--blocks` blocks (rotated order); each process times `--steps` updates after one warm-up.

    .venv/bin/python bench/bench_lora.py            # ~29M parameters, r=16 on every linear layer
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from common import block_order, scratch_params, spread  # noqa: E402


def measure(a: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from grpolab import config
    from grpolab.runtime import distributed as dist
    from grpolab.algos.losses import token_logprobs
    from grpolab.models import reference_policy, with_lora
    from grpolab.trainer.engine import build_engine, deepspeed_config

    params = config.apply_overrides([f"model.lora.r={a.r}", "model.lora.alpha=32", f"train.micro_batch_size={a.batch}",
                                     f"train.prompts_per_step={a.batch}", "train.group_size=2"], scratch_params(ROOT))
    dist.init()
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                               num_attention_heads=a.hidden // 64, num_key_value_heads=a.hidden // 64,
                               intermediate_size=a.intermediate, max_position_embeddings=a.length)
    model = with_lora(AutoModelForCausalLM.from_config(cfg), params.model.lora)
    frozen = None if a.r else AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)
    engine = build_engine(params, model, deepspeed_config(params, bf16=False))
    ids = torch.randint(0, a.vocab, (a.batch * 2, a.length))
    advantages = torch.randn(a.batch * 2, 1)

    def update() -> None:
        with torch.no_grad(), reference_policy(engine.module, frozen) as reference:
            ref_logp = token_logprobs(reference(ids).logits[:, :-1], ids[:, 1:])
        logp = token_logprobs(engine(ids).logits[:, :-1], ids[:, 1:])
        log_ratio = ref_logp - logp
        loss = (-(advantages * logp) + 0.04 * (log_ratio.exp() - log_ratio - 1)).mean()
        engine.backward(loss)
        engine.step()

    update()  # warm-up
    times = []
    for _ in range(a.steps):
        began = time.perf_counter()
        update()
        times.append(time.perf_counter() - began)
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
        "step_s": statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=4, help="prompts per update (2 completions each)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (the LoRA contender)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: measure once, print JSON
    a = parser.parse_args()
    if a.one:
        print("RESULT " + json.dumps(measure(a)))
        return
    contenders = {"full": 0, "lora": a.r}
    results: dict[str, list[dict]] = {name: [] for name in contenders}
    shared = [f"--{k}={getattr(a, k)}" for k in ("hidden", "layers", "intermediate", "vocab", "length", "batch", "steps")]
    for block in range(a.blocks):
        for name in block_order(list(contenders), block):
            out = subprocess.run([sys.executable, __file__, "--one", f"--r={contenders[name]}", *shared],
                                 capture_output=True, text=True, check=True, cwd=ROOT).stdout
            results[name].append(json.loads(out.split("RESULT ", 1)[1]))
    print(f"model: llama hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}; {a.batch * 2} sequences x {a.length} tokens "
          f"per update; {a.blocks} blocks x {a.steps} timed updates; median [min, max] over blocks")
    for name, runs in results.items():
        print(f"{name:5s} trainable {runs[0]['trainable'] / 1e6:.2f}M of {runs[0]['total'] / 1e6:.2f}M  "
              f"step {spread([r['step_s'] for r in runs], fmt='{:.2f}')} s  "
              f"peak RSS {spread([r['peak_rss_mb'] for r in runs], fmt='{:.0f}')} MB")
    ratio = [f["step_s"] / l["step_s"] for f, l in zip(results["full"], results["lora"])]
    memory = [f["peak_rss_mb"] - l["peak_rss_mb"] for f, l in zip(results["full"], results["lora"])]
    print(f"full / lora step time: {spread(ratio, fmt='{:.2f}')}; full - lora peak RSS: {spread(memory, fmt='{:.0f}')} MB")


if __name__ == "__main__":
    main()
