"""What the benches share: a scratch copy of params.yaml and a DeepSpeed engine on the base model."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pandas as pd
import torch


def scratch_params(root: Path) -> Path:
    """A copy of the project's params.yaml in a temporary folder: overrides are written back, not into the project's file."""
    scratch = Path(tempfile.mkdtemp()) / "params.yaml"
    shutil.copy(root / "params.yaml", scratch)
    return scratch


def engine_on_base(root: Path, params):
    """(engine, optimizer, reference model, tokenizer, train data) as the train stage builds them, from root/models/base."""
    import deepspeed

    from grpolab import distributed as dist
    from grpolab.data.tokenizer import load_tokenizer
    from grpolab.membership import WEIGHTED_TRAIN_FILE
    from grpolab.models import load_model
    from grpolab.train import deepspeed_config

    dist.init()
    torch.manual_seed(params.seed)
    model = load_model(root / "models/base")
    ref = load_model(root / "models/base").eval().requires_grad_(False)
    tokenizer = load_tokenizer(str(root / "models/base"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.train.learning_rate)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(params, False))
    return engine, optimizer, ref, tokenizer, pd.read_parquet(root / WEIGHTED_TRAIN_FILE)
