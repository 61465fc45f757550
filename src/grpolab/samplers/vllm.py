"""The `vllm` sampler: a vLLM engine in this process (colocated with the trainer, as TRL's `vllm_mode=colocate`
and verl's hybrid engine), holding a copy of the policy's weights that `sync` pushes in place before each batch
of rollouts.

- The engine starts from a model folder (the train stage's models/base) and never reads it again: `sync`
  hands it the policy's tensors by their Hugging Face names (`reload_weights`, no disk round trip), LoRA
  merged into the base weights, after the caller gathered ZeRO-3's partitions; tied embeddings stay tied
  (vLLM's loader ties what the config ties). The prefix cache is reset after each push.
- Rows are seeded one by one (`SamplingParams(seed=key)`, the key of (seed, row) that the hf sampler uses),
  so a row's completion does not depend on which process or batch samples it; the two engines draw other
  numbers from the same key, so their completions differ.
- The rollout carries vLLM's log-probs of the sampled tokens after temperature and top_p
  (`logprobs_mode="processed_logprobs"`): the sampler's log-probs that the trainer's mismatch correction
  compares with its own. vLLM returns no entropies: `token_entropy` is None.

Every check that can fail is made before the engine starts (`check`), each naming its param.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import sys

import torch

from grpolab.errors import ConfigError
from grpolab.samplers.base import Rollout, left_pad

# vLLM's CPU attention takes these head sizes only (csrc/cpu; Qwen2.5-0.5B: 64, 1.5B: 128).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)
CPU_KV_CACHE_GIB = 1.0  # the KV cache on the CPU when train.rollout.vllm_kv_cache_gib is empty
INSTALL = "make install (vLLM's CPU build, pinned in requirements-vllm.lock) or, on a GPU node, pip install vllm==0.32.0"
KEY = "train.rollout.backend"


def head_size(config) -> int:
    text = config.get_text_config()
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of KV cache one token takes: keys and values of every layer's KV heads."""
    text = config.get_text_config()
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return 2 * text.num_hidden_layers * kv_heads * head_size(config) * torch.tensor([], dtype=dtype).element_size()


def check(config, settings, dtype: torch.dtype, on_gpu: bool, positions: int | None = None) -> None:
    """Refuse, naming the param, what the vLLM backend cannot run: vLLM not installed, an architecture vLLM does
    not implement, a head size its CPU attention does not take, a KV cache smaller than one sequence of
    `positions` tokens (default: the model's positions)."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"{KEY}: vllm, but vLLM is not installed in this environment: {INSTALL}")
    from vllm import ModelRegistry

    archs = list(getattr(config, "architectures", None) or [])
    supported = set(ModelRegistry.get_supported_archs())
    if not archs or not any(a in supported for a in archs):
        raise ConfigError(f"{KEY}: vllm does not implement the model's architecture {archs or '(none in config.json)'}: "
                          f"use backend hf")
    if not on_gpu and head_size(config) not in CPU_HEAD_SIZES:
        raise ConfigError(f"{KEY}: vllm on the CPU takes attention head sizes {', '.join(map(str, CPU_HEAD_SIZES))}; the "
                          f"model's is {head_size(config)} (hidden_size / num_heads): change model.hidden_size or "
                          f"model.num_heads, or use backend hf")
    if settings.vllm_enable_sleep_mode and not on_gpu:
        raise ConfigError("train.rollout.vllm_enable_sleep_mode: vLLM has no sleep mode on the CPU: set it false")
    gib = kv_cache_gib(settings, on_gpu)
    length = positions or config.get_text_config().max_position_embeddings
    if gib is not None and gib * 2**30 < length * kv_bytes_per_token(config, dtype):
        need = length * kv_bytes_per_token(config, dtype) / 2**30
        raise ConfigError(f"train.rollout.vllm_kv_cache_gib: {gib} GiB holds less than one sequence of {length} tokens "
                          f"(prompt + completion; {need:.3g} GiB): raise it")


def kv_cache_gib(settings, on_gpu: bool) -> float | None:
    """The KV cache's size in GiB: as set; else on the CPU CPU_KV_CACHE_GIB; on a GPU None (vLLM sizes it from
    vllm_gpu_memory_utilization)."""
    if settings.vllm_kv_cache_gib is not None:
        return settings.vllm_kv_cache_gib
    return None if on_gpu else CPU_KV_CACHE_GIB


def hf_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The policy's weights by their Hugging Face names, as a model folder would hold them: a PEFT model's LoRA
    adapters merged into their base layers (W + scale B A, computed, the policy itself untouched)."""
    if not hasattr(model, "get_base_model"):
        return [(name, p.detach()) for name, p in model.named_parameters()]
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    lora = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    weights = []
    for name, p in base.named_parameters():
        if ".lora_" in name:
            continue
        tensor = p.detach()
        if ".base_layer." in name:
            owner, leaf = name.split(".base_layer.")
            layer = lora[owner]
            if leaf == "weight":
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A:
                        tensor = tensor + layer.get_delta_weight(adapter).to(tensor.dtype)
            name = f"{owner}.{leaf}"
        weights.append((name, tensor))
    return weights


def keep_default_group() -> None:
    """vLLM's in-process engine joins the default process group it finds (the trainer's, which DeepSpeed and
    grpolab's collectives use) and, shutting down, destroys it with its own groups: here it destroys its own only."""
    from vllm.distributed import parallel_state

    def destroy_own_groups() -> None:
        if parallel_state._WORLD:
            parallel_state._WORLD.destroy()
        parallel_state._WORLD = None
        parallel_state._NODE_COUNT = None

    parallel_state.destroy_distributed_environment = destroy_own_groups


def tolerate_context_proxies() -> None:
    """vLLM's CPU platform rebinds its kernel overrides by scanning every loaded module's globals with `hasattr`,
    which raises on a context-bound proxy (Flask's `current_app`, `request`, ... once MLflow's server code is
    imported): the same scan, skipping what cannot be inspected."""
    from vllm.triton_utils import dispatcher

    def rebind(overrides) -> None:
        wrappers = {id(original): wrapper for original, wrapper in overrides}  # the originals stay alive: ids are theirs
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            for attr, value in list((namespace or {}).items()):
                if id(value) in wrappers:
                    setattr(module, attr, wrappers[id(value)])
                    continue
                try:
                    kernel = vars(value).get("kernel") if hasattr(value, "__dict__") else None
                except Exception:  # a proxy bound to a context that is not there
                    continue
                if kernel is None or id(kernel) not in wrappers:
                    continue
                value.kernel = wrappers[id(kernel)]
                if not isinstance(value, type):
                    value.__dict__.pop("_kernel_arg_names", None)

    dispatcher._rebind_kernels = rebind


def _repack_tied_head(model: torch.nn.Module) -> None:
    """vLLM's in-place reload skips a tied output head (its weight is the embeddings', which the reload did
    update), so on the CPU the head's packed GEMM copy of that weight stays the old one: pack it again."""
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


class VLLMSampler:
    name = "vllm"
    reads_policy = False

    def __init__(self, model_dir, config, *, eos_ids: list[int], pad_id: int, settings, seed: int, dtype: torch.dtype):
        on_gpu = torch.cuda.is_available()
        check(config, settings, dtype, on_gpu)
        # The engine runs in this process (its weights are the ones `sync` pushes, with no copy through a pipe).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        keep_default_group()
        tolerate_context_proxies()

        gib = kv_cache_gib(settings, on_gpu)
        self.eos_ids, self.pad_id = eos_ids, pad_id
        # Several training processes on GPUs: vLLM's own executor would put every rank's engine on cuda:0; the
        # external launcher's (TRL's colocate mode) takes each rank's device and process group as they are.
        # (Not run on a GPU here: the CPU processes, tested, use the default executor.)
        launcher = {"distributed_executor_backend": "external_launcher"} if on_gpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else {}
        self.llm = LLM(
            model=str(model_dir), skip_tokenizer_init=True, dtype=str(dtype).removeprefix("torch."), seed=seed,
            enforce_eager=settings.vllm_enforce_eager or not on_gpu, gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
            kv_cache_memory_bytes=None if gib is None else int(gib * 2**30), logprobs_mode="processed_logprobs",
            max_model_len=config.get_text_config().max_position_embeddings, enable_sleep_mode=settings.vllm_enable_sleep_mode,
            **launcher,
        )
        self.sleep_mode, self.asleep = settings.vllm_enable_sleep_mode, False
        self.tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))

    def sync(self, model: torch.nn.Module) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": hf_weights(model)})
        if self.tied:
            self.llm.apply_model(_repack_tied_head)
        self.llm.reset_prefix_cache()

    def sample(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
               keys: torch.Tensor | None = None) -> Rollout:
        from vllm import SamplingParams

        common = {"max_tokens": max_new_tokens, "stop_token_ids": self.eos_ids, "detokenize": False}
        if keys is None:
            params = SamplingParams(temperature=0.0, **common)
        else:
            params = [SamplingParams(temperature=temperature, top_p=top_p, seed=int(k), logprobs=0, **common) for k in keys.tolist()]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        completions = [o.outputs[0] for o in outputs]
        width = max(len(c.token_ids) for c in completions)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        logp = torch.zeros((len(prompts), width)) if keys is not None else None
        for row, c in enumerate(completions):
            ids[row, : len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long)
            if logp is not None:
                logp[row, : len(c.token_ids)] = torch.tensor([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
        # vLLM stops a row at its first stop token and returns it: a row's tokens are exactly its completion
        lengths = torch.tensor([len(c.token_ids) for c in completions])
        mask = (torch.arange(width) < lengths[:, None]).long()
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_id)
        return Rollout(prompt_ids, prompt_mask, ids, mask, logp, None)

    def rest(self) -> None:
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def close(self) -> None:
        del self.llm
        gc.collect()
