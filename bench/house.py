"""The house in figures (issue 32, req 7): modules per folder of src/grpolab, the longest files and functions,
and the source files each dvc.yaml stage depends on. Run from the project root: `python bench/house.py`."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

from ruamel.yaml import YAML

SRC = Path("src/grpolab")


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.end_lineno - node.lineno + 1, f"{path.relative_to(SRC)}:{node.name}"


def source_files(dep: str) -> list[Path]:
    path = Path(dep)
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def main() -> None:
    files = sorted(SRC.rglob("*.py"))
    per_folder = Counter(str(f.parent.relative_to(SRC.parent)) for f in files if f.name != "__init__.py")
    print("modules per folder (not counting __init__.py):")
    for folder, n in sorted(per_folder.items()):
        print(f"  {folder}: {n}")
    print("longest files (lines):")
    for n, f in sorted(((len(f.read_text().splitlines()), f) for f in files), reverse=True)[:8]:
        print(f"  {n:4d} {f.relative_to(SRC.parent)}")
    print("longest functions (lines):")
    for n, name in sorted((fn for f in files for fn in functions(f)), reverse=True)[:8]:
        print(f"  {n:4d} {name}")
    print("source files each dvc.yaml stage depends on:")
    for name, stage in YAML(typ="safe").load(Path("dvc.yaml").read_text())["stages"].items():
        deps = [f for d in stage.get("deps", []) if d.startswith("src/") for f in source_files(d)]
        print(f"  {name}: {len(deps)}")


if __name__ == "__main__":
    main()
