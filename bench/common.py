"""What the benches share: a scratch copy of params.yaml, a DeepSpeed engine on the base model, and
blocks that alternate the contenders' order (so machine drift does not land on one side) with their
median [min, max] summaries."""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def scratch_params(root: Path) -> Path:
    """A copy of the project's params.yaml in a temporary folder: overrides are written back, not into the project's file."""
    scratch = Path(tempfile.mkdtemp()) / "params.yaml"
    shutil.copy(root / "params.yaml", scratch)
    return scratch


def engine_on_base(root: Path, params):
    """(engine, optimizer, reference model, tokenizer, train data) as the train stage builds them, from root/models/base."""
    import pandas as pd
    import torch

    from grpolab.runtime import distributed as dist
    from grpolab.data.tokenizer import load_tokenizer
    from grpolab.models import load_model
    from grpolab.paths import BASE_DIR, WEIGHTED_TRAIN_FILE
    from grpolab.trainer.engine import build_engine, deepspeed_config

    dist.init()
    torch.manual_seed(params.seed)
    model = load_model(root / BASE_DIR)
    ref = load_model(root / BASE_DIR).eval().requires_grad_(False)
    tokenizer = load_tokenizer(str(root / BASE_DIR))
    engine = build_engine(params, model, deepspeed_config(params, False))
    return engine, engine.optimizer, ref, tokenizer, pd.read_parquet(root / WEIGHTED_TRAIN_FILE)


def hf_sampler(params, engine, tokenizer):
    """The default rollout sampler of a training on `engine` (grpolab's decoder over the policy)."""
    from grpolab.samplers import make_sampler

    return make_sampler("hf", engine.module, tokenizer, batch_size=params.train.rollout_batch_size)


def make_batch(params, engine, ref_model, tokenizer, data, rewarder, variants, rollout_index: int):
    """(Batch, Sampled) of rollout batch `rollout_index` as a train step makes it: sample, score, weigh."""
    from grpolab.runtime import distributed as dist
    from grpolab.stages import train as T

    run = T.Training(params, engine, tokenizer, data, rewarder, hf_sampler(params, engine, tokenizer), variants, ref_model,
                     tracin=None, record=None, key="", bf16=False)  # what sample, score and weigh read
    rows, rollout = T.sample_rollouts(run, rollout_index)
    sampled = T.score(run, rows, rollout)
    with dist.gathered(engine):  # as the train loop weighs: on whole parameters at ZeRO-3
        return T.weigh(run, sampled, rollout), sampled


def block_order(names: Sequence[str], block: int) -> list[str]:
    """The contenders' order in block `block`: rotated by one each block, so each goes first equally
    often (two contenders: A, B then B, A)."""
    k = block % len(names)
    return [*names[k:], *names[:k]]


def take_turns(contenders: dict[str, Callable[[int], T]], block: int, repeats: int = 1) -> dict[str, list[T]]:
    """One block: `repeats` rounds, each contender called once a round with the block's index, in
    block_order; what each contender returned, by name."""
    results: dict[str, list[T]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name in block_order(list(contenders), block):
            results[name].append(contenders[name](block))
    return results


def alternate(contenders: dict[str, Callable[[int], T]], blocks: int) -> dict[str, list[T]]:
    """`blocks` blocks of one turn each: by name, what the contender returned in each block."""
    results: dict[str, list[T]] = {name: [] for name in contenders}
    for block in range(blocks):
        for name, got in take_turns(contenders, block).items():
            results[name] += got
    return results


def seconds(fn: Callable[[], object]) -> float:
    """Wall time of one call."""
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def spread(values: Sequence[float], scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    """'median [min, max]' of the values, each times `scale`."""
    return f"{fmt.format(statistics.median(values) * scale)} [{fmt.format(min(values) * scale)}, {fmt.format(max(values) * scale)}]"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table, ready for the docs."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)


# ---- Qwen2-shaped models and a tokenizer of a real vocabulary's size, built locally (no hub) ----------------

QWEN_VOCAB = 151_936  # Qwen2.5's vocabulary
QWEN_SHAPES = {  # (hidden, layers, heads, kv heads, intermediate)
    "tiny": (32, 2, 2, 1, 64),
    "narrow": (64, 2, 4, 2, 128),
    "qwen2.5-0.5b": (896, 24, 14, 2, 4864),
    "qwen2.5-1.5b": (1536, 28, 12, 2, 8960),
}
PAD_ID, EOS_ID = 0, 1


def qwen2_config(shape: str, vocab: int = QWEN_VOCAB, max_positions: int = 4096):
    """Qwen2.5's architecture (RoPE theta 1e6, tied embeddings) at one of QWEN_SHAPES."""
    from transformers import Qwen2Config

    hidden, layers, heads, kv_heads, intermediate = QWEN_SHAPES[shape]
    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=max_positions,
                       rope_theta=1e6, tie_word_embeddings=True, eos_token_id=EOS_ID, pad_token_id=PAD_ID, bos_token_id=None)


def byte_tokenizer(vocab: int = QWEN_VOCAB):
    """A byte-level BPE of `vocab` ids without merges: `<pad>` 0, `<eos>` 1, `<unk>` 2, the 256 byte symbols, then
    filler tokens `w3`, `w4`, ... up to `vocab`. Every byte of a prompt is one token; every id decodes to text (so a
    random model's completions differ as texts); transformers' Qwen2Tokenizer loads it as saved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    filler = (f"w{i}" for i in range(vocab))
    while len(table) < vocab:
        table.setdefault(next(filler), len(table))
    bpe = Tokenizer(models.BPE(vocab=table, merges=[], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def byte_prompts(n: int, length: int, seed: int = 0) -> list[str]:
    """n prompts of `length` random lowercase letters: `length` tokens each under `byte_tokenizer`."""
    import random

    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length)) for _ in range(n)]
