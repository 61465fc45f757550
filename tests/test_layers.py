"""The tree shows the pipeline (issue 21): one module per dvc.yaml stage, no stage importing another,
layers that import only downwards, no import cycles, and the files stages exchange named once."""

import ast
from pathlib import Path

from ruamel.yaml import YAML

from grpolab import paths
from grpolab.stages import STAGES

from conftest import REPO, grpolab_modules

# Top down; a module is in the layer of its longest matching prefix and imports only from its layer or below.
LAYERS = {
    "entry points": ["grpolab.cli", "grpolab.__main__", "grpolab.study", "grpolab.analyze_credit", "grpolab.ui",
                     "grpolab.workspace", "grpolab.clean"],
    "stages": ["grpolab.stages"],
    "trainer": ["grpolab.trainer"],
    "libraries": ["grpolab.config", "grpolab.data", "grpolab.models", "grpolab.samplers", "grpolab.logprobs", "grpolab.rewards",
                  "grpolab.tracking", "grpolab.mia"],
    "foundations": ["grpolab.algos", "grpolab.mia.scores", "grpolab.mia.roc", "grpolab.data.tasks", "grpolab.errors",
                    "grpolab.paths", "grpolab.runtime"],
}
RANK = {prefix: rank for rank, prefixes in enumerate(reversed(LAYERS.values())) for prefix in prefixes}


MODULES = grpolab_modules()


def imports(name: str) -> set[str]:
    """The grpolab modules `name` imports anywhere in its code (at the top, inside functions, for type checking)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return {m for m in out if m in MODULES and m not in (name, "grpolab")}


def layer(name: str) -> int:
    prefix = max((p for p in RANK if name == p or name.startswith(p + ".")), key=len, default=None)
    assert prefix is not None, f"{name}: in no layer of tests/test_layers.py"
    return RANK[prefix]


def test_every_stage_is_a_module_of_the_stages_package_named_as_the_stage():
    stages = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(STAGES) == list(stages)
    for name in STAGES:
        assert STAGES[name].function().__module__ == f"grpolab.stages.{name}"
        assert stages[name]["cmd"] == f"grpolab stage {name}"


def test_a_stage_with_processes_names_the_run_it_resumes_in_the_registry():
    """The hook a stage with processes defines is in the registry's type (issue 32, req 6), checked when it is built."""
    import inspect

    import pytest

    from grpolab.stages import Stage

    for stage in STAGES.values():
        if stage.processes:
            hook = stage.resumed()
            assert hook.__module__ == f"grpolab.stages.{stage.name}" and list(inspect.signature(hook).parameters) == ["params"]
    with pytest.raises(TypeError, match=r"Stage\('train', processes=True\): name the function of grpolab.stages.train"):
        Stage("train", processes=True)
    with pytest.raises(TypeError, match="for a stage with processes only"):
        Stage("sft", resumed_run="resumed_run")


def test_no_stage_imports_another_and_no_library_imports_a_stage():
    for name in MODULES:
        stage_imports = sorted(m for m in imports(name) if m.startswith("grpolab.stages"))
        if name.startswith("grpolab.stages."):
            assert not stage_imports, f"{MODULES[name].relative_to(REPO)} imports {stage_imports}: a stage imports no stage"
        elif name not in ("grpolab.cli", "grpolab.stages"):
            assert not stage_imports, f"{MODULES[name].relative_to(REPO)} imports {stage_imports}: only entry points do"


def test_layers_import_downwards_only():
    wrong = [f"{MODULES[m].relative_to(REPO)} imports {i}" for m in MODULES for i in sorted(imports(m)) if layer(i) > layer(m)]
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = {m: imports(m) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(n):], n]))
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_exchanged_files_are_the_outputs_dvc_yaml_names():
    stages = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())["stages"]

    def outputs(stage: dict) -> set[str]:
        entries = [e for kind in ("outs", "metrics", "plots") for e in stage.get(kind, [])]
        return {next(iter(e)) if isinstance(e, dict) else e for e in entries}

    everything = set().union(*(outputs(s) for s in stages.values()))
    named = {k: v for k, v in vars(paths).items() if isinstance(v, Path)}
    for key, path in named.items():
        if key == "CHECKPOINT_DIR":
            assert str(path) not in everything  # the train stage's own, to resume from: never a DVC output
        elif key == "INPUTS_DIR":
            assert all(o.startswith(f"{path}/") for o in outputs(stages["inputs"]))
        else:
            assert str(path) in everything, f"grpolab.paths.{key} ({path}) is no output in dvc.yaml"
    for name, headline in paths.HEADLINES.items():
        assert str(headline) in outputs(stages[name]), f"{headline}: not among stages.{name}'s metrics"


def test_the_processes_that_touch_no_tensor_import_no_torch():
    """`grpolab.config` reads the algos' registries for the params' allowed values; their modules import torch
    lazily (`runtime.lazy`; `rewards` and `runtime.device` likewise), so the processes that never touch a tensor skip its import: the `inputs` stage (which
    DVC runs every time), `summary`, the pipeline flow, `grpolab run`, `study` and `report`. The registries still
    hold torch's functions, which import it on their first call."""
    import subprocess
    import sys

    code = ("import sys, grpolab.cli, grpolab.stages.inputs, grpolab.stages.summary, grpolab.study.run, grpolab.study.report\n"
            "sys.path.insert(0, 'flows'); import pipeline\n"
            "from grpolab import config\n"
            "params = config.Params()\n"
            "assert params.train.loss.policy.name in __import__('grpolab.algos.losses').algos.losses.POLICY_LOSSES\n"
            "loaded = [m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed', 'vllm')]\n"
            "assert not loaded, loaded[:5]\n"
            "from grpolab.algos.advantages import ADVANTAGE_ESTIMATORS\n"
            "import torch\n"
            "print(ADVANTAGE_ESTIMATORS['grpo'](torch.tensor([[1.0, 0.0]]), torch.tensor([[1, 1]])).tolist())\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[[0.5, -0.5]]"
