"""The rollout backends side by side: the vLLM sampler (`samplers.vllm`, an in-process engine over the same
weights), grpolab's decoder (`samplers.hf.sample`) and transformers' `model.generate`, same model, prompts and
settings (temperature 1, top_p 1, the same stop id), in alternating blocks (each contender first in turn).
Prints each block's generated tokens/s and the ratios to grpolab's decoder, median [min, max]. A random model
almost never emits its stop token, so every contender generates every token.

    python bench/bench_vllm.py                              # (a) grpolab's default tiny Llama, 32 rows x 128 new tokens
    python bench/bench_vllm.py --shape qwen2.5-0.5b         # (b) Qwen2.5-0.5B's shape and vocabulary (494 M parameters)
    python bench/bench_vllm.py --shape qwen2.5-0.5b --dtype bfloat16
    python bench/bench_vllm.py --train --shape qwen2.5-0.5b --rows 8 --new-tokens 32 --blocks 2   # (c, d) a train step, peak RSS

With --train, each block runs the train stage (`grpolab stage train`, a fresh process, 2 steps) once per backend
in a workspace of its own (bench_memory's: the shape's Qwen2 at the real vocabulary, a byte-level tokenizer, a
hashed reward), and reports step 2's `train/step_time` and the process's peak resident set (wait4's ru_maxrss).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rollout import make_prompts  # noqa: E402
from common import EOS_ID, PAD_ID, QWEN_VOCAB, block_order, markdown_table, qwen2_config, spread  # noqa: E402

DEFAULT_VOCAB = 512  # the default tiny model's tokenizer target (model.vocab_size)


def model_config(shape: str):
    """The model's config: `default` grpolab's default tiny Llama (params.yaml's model section), else a Qwen2.5
    shape of common.QWEN_SHAPES at Qwen2.5's vocabulary."""
    from transformers import LlamaConfig

    if shape == "default":
        return LlamaConfig(vocab_size=DEFAULT_VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4, intermediate_size=512, max_position_embeddings=1024, eos_token_id=EOS_ID,
                           pad_token_id=PAD_ID, bos_token_id=None)
    return qwen2_config(shape, max_positions=1024)


def train_steps(shape: str, blocks: int, rows: int, prompt_tokens: int, new_tokens: int) -> None:
    """(c, d): one train step's wall time and the train stage's peak RSS with each backend, alternating blocks."""
    import shutil

    import pandas as pd
    from bench_memory import REWARD, build_base, overrides, peak_rss_mb, source_tree, write_data, write_params

    scratch = Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    tree = source_tree("", scratch / "tree")
    base = scratch / "base"
    build_base(base, shape)
    settings = {**overrides(rows, prompt_tokens, new_tokens), "train.steps": 2}
    step, peak = {"hf": [], "vllm": []}, {"hf": [], "vllm": []}
    for block in range(blocks):
        for backend in block_order(["hf", "vllm"], block):
            workspace = scratch / f"run-{block}-{backend}"
            (workspace / "models").mkdir(parents=True)
            (workspace / "models/base").symlink_to(base)
            write_data(workspace / "data", prompt_tokens)
            (workspace / "reward.py").write_text(REWARD)
            write_params(tree, workspace, {**settings, "train.rollout": {"backend": backend}})
            peak[backend].append(peak_rss_mb(tree, workspace, "train", []) / 1024)
            step[backend].append(float(pd.read_csv(workspace / "metrics/train_curve.csv")["train/step_time"].iloc[-1]))
            print(f"block {block + 1}: {backend:>4}: step 2 {step[backend][-1]:.1f} s, peak RSS {peak[backend][-1]:.2f} GB", flush=True)
            shutil.rmtree(workspace)
    shutil.rmtree(scratch)
    print(f"\n{shape}, fp32 on the CPU, the train stage: {rows} rows ({rows // 4} prompts x 4), prompts of {prompt_tokens} "
          f"tokens, {new_tokens} new tokens, KL to the reference on, {blocks} blocks")
    print(markdown_table(["backend", "step 2 wall time, s, median [min, max]", "peak RSS, GB, median [min, max]"],
                         [[b, spread(step[b]), spread(peak[b], fmt="{:.2f}")] for b in step]))


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from grpolab.config import validate
    from grpolab.samplers import sample_keys
    from grpolab.samplers.hf import sample
    from grpolab.samplers.vllm import VLLMSampler

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="default", help="default, or a shape of bench/common.py's QWEN_SHAPES")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--train", action="store_true", help="a train step's wall time and the stage's peak RSS instead")
    a = parser.parse_args()
    if a.train:
        return train_steps(a.shape, a.blocks, a.rows, a.prompt_tokens, a.new_tokens)
    dtype = getattr(torch, a.dtype)
    cfg = model_config(a.shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    prompts = make_prompts(a.rows, a.prompt_tokens, DEFAULT_VOCAB if a.shape == "default" else QWEN_VOCAB)
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(p[::-1]) for p in prompts], batch_first=True, padding_value=PAD_ID).flip(1)
    mask = (ids != PAD_ID).long()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        settings = validate({"train": {"rollout": {"backend": "vllm", "vllm_kv_cache_gib": 2}}}).train.rollout
        engine = VLLMSampler(folder, cfg, eos_ids=[EOS_ID], pad_id=PAD_ID, settings=settings, seed=0, dtype=dtype)

        def keys(block: int):
            return sample_keys(block, list(range(len(prompts))))

        def tokens(r) -> int:
            return int(r.completion_mask.sum())

        def generate(block: int) -> int:
            torch.manual_seed(block)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=a.new_tokens, do_sample=True, top_k=0,
                                     eos_token_id=[EOS_ID], pad_token_id=PAD_ID)[:, ids.shape[1]:]
            seen = (out == EOS_ID).cumsum(-1)
            return int(((seen == 0) | ((seen == 1) & (out == EOS_ID))).sum())

        contenders = {
            "vllm": lambda b: tokens(engine.sample(prompts, max_new_tokens=a.new_tokens, keys=keys(b))),
            "hf": lambda b: tokens(sample(model, prompts, max_new_tokens=a.new_tokens, eos_ids=[EOS_ID], pad_id=PAD_ID, keys=keys(b))),
            "model.generate": generate,
        }
        for fn in contenders.values():  # warm-up
            fn(0)
        rates: dict[str, list[float]] = {name: [] for name in contenders}
        for block in range(a.blocks):
            for name in block_order(list(contenders), block):
                began = time.perf_counter()
                n = contenders[name](block + 1)
                rates[name].append(n / (time.perf_counter() - began))
            print(f"block {block + 1}: " + ", ".join(f"{n} {rates[n][-1]:,.0f} tok/s" for n in contenders), flush=True)
        engine.close()
    params = sum(p.numel() for p in model.parameters())
    print(f"\n{a.shape} ({params / 1e6:,.1f} M parameters, vocabulary {cfg.vocab_size:,}), {a.dtype} on the CPU "
          f"({torch.get_num_threads()} threads), {a.rows} rows x {a.new_tokens} new tokens, prompts of "
          f"{a.prompt_tokens // 2}-{a.prompt_tokens} tokens, {a.blocks} blocks")
    print(markdown_table(["contender", "tokens/s, median [min, max]", "/ hf, median [min, max]"],
                         [[name, spread(v, fmt="{:,.0f}"), spread([x / h for x, h in zip(v, rates["hf"])], fmt="{:.2f}")]
                          for name, v in rates.items()]))
    print(f"(medians: {', '.join(f'{n} {statistics.median(v):,.0f}' for n, v in rates.items())})")


if __name__ == "__main__":
    main()
