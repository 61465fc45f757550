"""The `inputs` stage: what DVC needs to know of the user's own files.

`data.train_files`, `model.name_or_path`, `train.rewards.judge_model`, … are paths in params.yaml, and
`dvc.yaml` cannot list a param's paths as deps (its templating takes no lists, and they are often
empty). So this first stage, which DVC runs every time (`always_changed`), writes each file's
content digest to `data/inputs/<group>.json`, and each stage that reads a group lists that file
among its deps: editing a file's content reruns exactly the stages that read it, and an unchanged
digest lets DVC skip them as before.
"""

from __future__ import annotations

import json

from grpolab.config import Params, flatten
from grpolab.runtime.fsutil import atomic_write_text, content_digest
from grpolab.paths import INPUTS_DIR, USER_FILES


def inputs(params: Params, tracker=None) -> dict:
    values = flatten(params)
    for name, keys in USER_FILES.items():
        record = {}
        for key in keys:
            paths = values[key] if isinstance(values[key], list) else [values[key]] if values[key] else []
            record[key] = [{"path": str(p), "sha256": content_digest([p])} for p in paths]
        atomic_write_text(INPUTS_DIR / name, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return {}
