"""The pipeline's stages in order: `grpolab stage NAME` runs one, `dvc.yaml` and the Prefect flow
chain them. Each stage reads params and files and writes files; nothing else drives it."""

from __future__ import annotations

from collections.abc import Callable

from grpolab import tracking
from grpolab.config import Params
from grpolab.data.prepare import prepare
from grpolab.evaluate import evaluate
from grpolab.sft import sft

STAGES: dict[str, Callable[..., dict]] = {
    "prepare": prepare,
    "sft": sft,
    "evaluate": evaluate,
}


def run_stage(name: str, params: Params) -> dict:
    with tracking.stage_run(params, name) as tracker:
        return STAGES[name](params, tracker)
