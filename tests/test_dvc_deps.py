"""DVC knows every input (issue 11, req 5): each stage's deps hold every grpolab module its code imports."""

import ast
import inspect
from pathlib import Path

from ruamel.yaml import YAML

from grpolab.stages import STAGES, stage_function

from conftest import REPO

SRC = REPO / "src"


def _module_file(name: str) -> Path | None:
    path = SRC.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _validation_only(importer: str, imported: str) -> bool:
    """Params validation (grpolab.config) reads the allowed names and limits from the registries (algos/,
    rewards, mia.scores, the task's problem space): it can refuse params but changes no stage's output, so those
    modules are no deps by way of config (else editing a mitigation would rerun sft). A stage that computes
    with a registry, or reads its knob defaults, imports it itself."""
    return importer.startswith("grpolab.config") and not imported.startswith(("grpolab.config", "grpolab.errors", "grpolab.runtime.fsutil"))


def imported_files(module: str) -> set[Path]:
    """Every grpolab source file `module` imports, at the top or inside a function, transitively."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: list[str] = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [a.name for a in node.names if a.name.startswith("grpolab")]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                if base.startswith("grpolab"):
                    found.append(base)
                    found += [f"{base}.{a.name}" for a in node.names]  # `from grpolab import tracking` is a module
        found += [".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 1)]  # its packages run first
        todo += [m for m in found if not _validation_only(name, m)]
    return {p for p in seen if _holds_code(p)}


def dep_files(stage: dict) -> set[Path]:
    files: set[Path] = set()
    for dep in stage.get("deps", []):
        path = REPO / dep
        if dep.startswith("src/"):
            files |= set(path.rglob("*.py")) if path.is_dir() else {path}
    return {p for p in files if _holds_code(p)}


def _holds_code(path: Path) -> bool:
    """A package's __init__ with nothing or only its docstring holds no code: no dep."""
    module = ast.parse(path.read_text())
    return path.name != "__init__.py" or bool(module.body[1:] if ast.get_docstring(module) else module.body)


def test_every_module_a_stage_imports_is_among_its_deps():
    stages = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(STAGES)
    for name in STAGES:
        needed = imported_files(inspect.getmodule(stage_function(name)).__name__)
        listed = dep_files(stages[name])
        missing = sorted(str(p.relative_to(REPO)) for p in needed - listed)
        assert not missing, f"dvc.yaml: stages.{name}.deps lacks {missing}"
        unused = sorted(str(p.relative_to(REPO)) for p in listed - needed)
        assert not unused, f"dvc.yaml: stages.{name}.deps lists {unused}, which its code does not import"


def test_each_stage_reads_the_digests_of_the_user_files_it_reads():
    stages = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())["stages"]
    digests = {name: {d for d in stage["deps"] if d.startswith("data/inputs/")} for name, stage in stages.items()}
    assert digests == {
        "inputs": set(),
        "prepare": {"data/inputs/data.json", "data/inputs/model.json"},  # the user's data, the checkpoint's tokenizer
        "sft": {"data/inputs/model.json"},  # the checkpoint's weights
        "mia": {"data/inputs/reference_model.json"},
        "train": {"data/inputs/judge_model.json", "data/inputs/reward_file.json"},
        "evaluate": {"data/inputs/reference_model.json", "data/inputs/reward_file.json"},
        "summary": set(),
    }
    from grpolab.paths import USER_FILES

    outs = {next(iter(o)) if isinstance(o, dict) else o for o in stages["inputs"]["outs"]}
    assert outs == {f"data/inputs/{name}" for name in USER_FILES}
    assert set(stages["inputs"]["params"]) == {key for keys in USER_FILES.values() for key in keys}
