"""Where models run and in which precision: the one place that decides, for every stage.

Device: `cuda:LOCAL_RANK` when CUDA is available (one GPU per process), else the CPU.
Precision (`model.dtype`): `auto` is bf16 on a GPU and fp32 on the CPU. Weights are loaded in
that dtype by `from_pretrained(dtype=...)`, which keeps the buffers a model computes in fp32
(RoPE's `inv_freq`) in fp32, as DeepSpeed does for the policy; casting a loaded model with
`.to(bf16)` would round them too and make a different model. What is computed from logits
(log-probs, entropies, losses, MIA statistics) is computed in fp32 whatever the weights' dtype.
SFT trains fp32 weights under autocast (what TRL's `bf16=True` does), GRPO under DeepSpeed's bf16
(fp32 master weights and fp32 gradient accumulation, `train.deepspeed.zero_stage`).
"""

from __future__ import annotations

import os
from contextlib import nullcontext

from grpolab.errors import ConfigError
from grpolab.runtime.lazy import lazy_import

torch = lazy_import("torch")  # config reads DTYPE_CHOICES in processes that need no torch

DTYPES = ("bfloat16", "float32")  # torch's dtypes of these names
DTYPE_CHOICES = ("auto", *DTYPES)  # model.dtype's values


def device() -> torch.device:
    """This process's device: its GPU (by LOCAL_RANK) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def working_dtype(setting: str) -> torch.dtype:
    """The dtype models work in for `model.dtype` = `setting`: `auto` is bf16 on a GPU, fp32 on the CPU."""
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, setting)


def use_deterministic(on: bool) -> None:
    """`train.deterministic`: torch's deterministic kernels (where an op has none, torch warns naming it rather
    than failing a long run), with the cuBLAS workspace setting they need. Call it before the process's first
    matmul on a GPU: cuBLAS reads the setting when torch creates its handle."""
    if not on:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # or a user's ":16:8" (less memory, slower)
    torch.use_deterministic_algorithms(True, warn_only=True)


def autocast(dtype: torch.dtype):
    """The context SFT's forward runs in: autocast to bf16 when working in bf16 (fp32 weights stay fp32), else nothing."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device().type, dtype=dtype)


def processes_beyond_gpus(processes_on_node: int, gpus: int, key: str) -> str | None:
    """Why `processes_on_node` processes (the count `key` names) cannot run one per GPU on `gpus` GPUs; None if they can."""
    if processes_on_node <= gpus:
        return None
    return (f"{key}: {processes_on_node} processes on this node but it has {gpus} GPU{'s' if gpus != 1 else ''}: "
            "grpolab runs one process per GPU")


def visible_gpus() -> tuple[list[str], str]:
    """The GPUs this process may use, and where the list comes from: the entries of CUDA_VISIBLE_DEVICES when it is
    set (indices or UUIDs, passed on as given; `""` and `-1` hide every GPU, as CUDA reads them), else every GPU torch
    sees. The one reading of CUDA_VISIBLE_DEVICES: what a study hands out to its cells, what a stage's runs are tagged with."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        gpus = [] if listed.strip() in ("", "-1") else [g.strip() for g in listed.split(",") if g.strip()]
        return gpus, f"CUDA_VISIBLE_DEVICES={listed}"
    count = torch.cuda.device_count()
    return [str(i) for i in range(count)], f"{count} GPU{'s' if count != 1 else ''} visible"


def check_processes_fit(processes_on_node: int, key: str) -> None:
    """One process per GPU: refuse, before any work, more processes on this node than it has GPUs (on CPU a
    process is a process)."""

    if torch.cuda.is_available() and (reason := processes_beyond_gpus(processes_on_node, torch.cuda.device_count(), key)):
        raise ConfigError(reason)
