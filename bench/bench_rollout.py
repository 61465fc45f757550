"""grpolab's rollout sampler (`samplers.hf.sample`) against transformers' `model.generate`, same model, prompts and
settings (temperature, top_p, no top-k, the same stop ids, a KV cache each), side by side in alternating
blocks (sample, generate; then generate, sample; ...). Prints each block's generated tokens/s and the ratio
sample / generate, median [min, max]. A random model almost never emits EOS, so both generate every token.

    python bench/bench_rollout.py                          # CPU: a narrow Qwen2 at Qwen2.5's vocabulary
    python bench/bench_rollout.py --rows 512 --new-tokens 256 --shape qwen2.5-0.5b   # the GPU check's setting

`bench/gpu_check.py` runs `measure` on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EOS_ID, PAD_ID, QWEN_SHAPES, QWEN_VOCAB, block_order, markdown_table, qwen2_config, spread  # noqa: E402


def build_model(shape: str, dtype, device):
    """A Qwen2.5-architecture model at `shape` (common.QWEN_SHAPES), random weights, in `dtype` on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(qwen2_config(shape), dtype=dtype).eval()


def make_prompts(rows: int, length: int, vocab: int = QWEN_VOCAB, seed: int = 0) -> list[list[int]]:
    """Token ids of `rows` prompts of length/2 to `length` tokens."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(rng.randint(length // 2, length))] for _ in range(rows)]


def measure(model, prompts: list[list[int]], new_tokens: int, blocks: int, temperature: float = 1.0, top_p: float = 1.0,
            rollout_batch_size: int | None = None, log=print) -> dict[str, list[float]]:
    """Generated tokens/s of each contender in each block (alternating order), on the model's device."""
    import torch

    from grpolab.samplers import left_pad, sample_keys
    from grpolab.samplers.hf import sample

    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ids, mask = left_pad(prompts, pad_id=PAD_ID)

    def grpolab_sample(block: int) -> int:
        r = sample(model, prompts, max_new_tokens=new_tokens, eos_ids=[EOS_ID], pad_id=PAD_ID, temperature=temperature, top_p=top_p,
                   keys=sample_keys(block, list(range(len(prompts)))), batch_size=rollout_batch_size)
        return int(r.completion_mask.sum())

    def hf_generate(block: int) -> int:
        torch.manual_seed(block)
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                                 do_sample=True, temperature=temperature, top_p=top_p, top_k=0, eos_token_id=[EOS_ID],
                                 pad_token_id=PAD_ID)
        generated = out[:, ids.shape[1]:]
        finished = (generated == EOS_ID).cumsum(-1)
        return int(((finished == 0) | ((finished == 1) & (generated == EOS_ID))).sum())

    contenders = {"samplers.hf.sample": grpolab_sample, "model.generate": hf_generate}
    for fn in contenders.values():  # warm-up: kernels, allocator, caches
        fn(0)
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for block in range(blocks):
        for name in block_order(list(contenders), block):
            sync()
            began = time.perf_counter()
            tokens = contenders[name](block + 1)
            sync()
            rates[name].append(tokens / (time.perf_counter() - began))
        log(f"block {block + 1}: " + ", ".join(f"{n} {rates[n][-1]:,.0f} tok/s" for n in contenders)
            + f" -> {rates['samplers.hf.sample'][-1] / rates['model.generate'][-1]:.2f}x")
    return rates


def summary(rates: dict[str, list[float]]) -> dict[str, float]:
    ratios = [a / b for a, b in zip(rates["samplers.hf.sample"], rates["model.generate"])]
    return {"sample_tokens_per_s": statistics.median(rates["samplers.hf.sample"]),
            "generate_tokens_per_s": statistics.median(rates["model.generate"]),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=QWEN_SHAPES, default="narrow")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(a.shape, dtype, device)
    rates = measure(model, make_prompts(a.rows, a.prompt_tokens), a.new_tokens, a.blocks, a.temperature, a.top_p)
    s = summary(rates)
    print()
    print(f"{a.shape} on {device} ({dtype}), {a.rows} rows x {a.new_tokens} new tokens, prompts of "
          f"{a.prompt_tokens // 2}-{a.prompt_tokens} tokens, temperature {a.temperature}, top_p {a.top_p}, {a.blocks} blocks")
    print(markdown_table(["contender", "tokens/s, median [min, max]"],
                         [[name, spread(v, fmt="{:,.0f}")] for name, v in rates.items()]))
    print(f"\nsamplers.hf.sample / model.generate: {s['ratio_median']:.2f}x [{s['ratio_min']:.2f}, {s['ratio_max']:.2f}]")


if __name__ == "__main__":
    main()
