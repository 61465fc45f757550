"""Modules imported on first use.

Every grpolab process reads its params (`grpolab.config`), and the params' allowed values come from
registries whose functions are torch's (`grpolab.algos`, `grpolab.mia.scores`, `grpolab.rewards`,
`runtime.device`). Those modules import torch through `lazy_import`, so a process that never touches a tensor
(the `inputs` and `summary` stages, `grpolab run`, `study` and `report` themselves, the pipeline flow) skips
torch's import, about 2 s of CPU each time.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


class _Lazy(ModuleType):
    """Stands for a module until an attribute of it is first read, then imports it and holds its attributes.
    Not in sys.modules: other code (scipy's array checks look there for torch) sees the module only once
    it is really imported."""

    def __getattr__(self, attribute: str):
        module = importlib.import_module(self.__name__)
        self.__dict__.update(module.__dict__)  # later reads: plain attributes, no import machinery
        return getattr(module, attribute)  # an attribute the module gets later (a submodule) comes here each time


def lazy_import(name: str) -> ModuleType:
    """The module `name`, imported when one of its attributes is first read (e.g. `torch.float32` in a
    function, when that function first runs)."""
    if importlib.util.find_spec(name) is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return _Lazy(name)
