"""The tokenizer: a byte-level BPE trained on the task corpus, or a user checkpoint's own."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from grpolab.errors import ConfigError

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
# Tags are ordinary (non-special) tokens so that decoding with skip_special_tokens keeps them.
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """BPE over bytes with every digit its own pre-token, so numbers are spelled digit by digit
    (merged digits would hide the column structure arithmetic relies on)."""
    bpe = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIAL_TOKENS)
    tokenizer.add_tokens(TAG_TOKENS)
    return tokenizer


def load_tokenizer(path: str, key: str = "model.name_or_path") -> PreTrainedTokenizerBase:
    """The tokenizer saved in `path` (the param `key` named it): it needs an EOS token, which ends every
    SFT response and every generation, and stands in as the pad token where there is none."""

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token is None:
        pad = "" if tokenizer.pad_token is None else f" (its pad token {tokenizer.pad_token!r} is no stand-in)"
        raise ConfigError(
            f"{key}: the tokenizer in {path} has no EOS token{pad}: responses could not end and generation could not "
            "stop; give it one (tokenizer.add_special_tokens({'eos_token': ...}) and save_pretrained)"
        )
    if tokenizer.pad_token is None:  # many causal LMs ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Prompt ids with the tokenizer's own special tokens (a checkpoint's BOS, if it uses one), and one BOS
    only: a chat template that writes the BOS into the text (Llama 3's does) gets no second one."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos]:
        ids = ids[1:]
    return ids


def encode_response(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Response ids ending in EOS, so the model learns where to stop."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
