"""One name each (issue 32, req 5): every module a docstring, comment or doc page names exists. A renamed or
moved module leaves no reader looking for a file that is not there (the history pages, docs/changelog.md and the
studies' reports, record what was: they are not read here)."""

import ast
import importlib.util
import re
from functools import cache
from pathlib import Path

from conftest import REPO, grpolab_modules

SRC = REPO / "src"
PACKAGE = SRC / "grpolab"


def read_here() -> list[Path]:
    """The text a reader of the code or the manual reads: the code's docstrings and comments (src/, bench/, flows/,
    tests/), the manual (docs/), the front page, the pipeline's, deployments' and images' files, the study files;
    not the pages that record history, nor this file's examples of stale names."""
    texts = [p for folder in ("src", "bench", "flows", "tests") for p in (REPO / folder).rglob("*.py")]
    texts += [p for p in (REPO / "docs").rglob("*.md") if p.relative_to(REPO / "docs").parts[0] != "studies" or p.name != "report.md"]
    texts += [p for p in (REPO / "docker").rglob("*") if p.is_file()] + sorted((REPO / "studies").glob("*.yaml"))
    texts += [REPO / name for name in ("README.md", "Makefile", "dvc.yaml", "prefect.yaml")]
    return [p for p in texts if p not in (REPO / "docs/changelog.md", Path(__file__))]


# A path of this repo's with a folder in it (`src/grpolab/stages/train.py`, `algos/losses.py`, `tests/lab.py`): not
# a piece of a longer path (an absolute one, `.venv/…`, `{root}/reward.py`).
PATH = re.compile(r"(?<![\w./{}-])((?:[\w-]+/)+[\w-]+\.py)\b")
# A file named alone in backticks or parentheses (`recorder.py`, (tracking.py)), as the docs and docstrings do.
BARE = re.compile(r"(?<=[`(])([\w-]+\.py)(?=[`)])")
# A dotted module name, with what it names in it when it goes on (`grpolab.runtime.failures.USER_ERRORS`).
DOTTED = re.compile(r"(?<![\w.])grpolab(?:\.\w+)+(?![\w-])")  # not a file name (grpolab.egg-info)
# A module's class or constant by the module's own name, in backticks (`tracin.TracIn`, `loss_weights.LossWeighting`).
MEMBER = re.compile(r"`(\w+)\.([A-Z]\w*)")


MODULES = grpolab_modules()


@cache
def defined(path: Path) -> set[str]:
    """The names a module defines or imports at its top level, and the names its classes define."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            names |= {t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def names_as_data() -> set[str]:
    """`grpolab.x` strings the code uses as names of its own, not of modules: MLflow tags (`grpolab.stage`), loggers."""
    found = set()
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and DOTTED.fullmatch(node.value):
                found.add(node.value)
            elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
                head = str(node.values[0].value)  # f"grpolab.stage.{name}": the logger of each stage
                if DOTTED.fullmatch(head.rstrip(".")) and head.endswith("."):
                    found.add(head.rstrip("."))
    return found


AS_DATA = names_as_data()


def dotted_resolves(name: str) -> bool:
    if any(name == d or name.startswith(d + ".") for d in AS_DATA):
        return True
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        if module in MODULES:
            rest = parts[cut:]
            return not rest or rest[0] in defined(MODULES[module]) and (len(rest) == 1 or rest[1] in defined(MODULES[module]))
    return False


def folders() -> set[str]:
    return {p.name for root in (REPO, SRC, PACKAGE) for p in root.iterdir() if p.is_dir()}


def path_resolves(path: str) -> bool:
    first = path.split("/")[0]
    if first not in folders() and first != "grpolab" and importlib.util.find_spec(first) is not None:
        return True  # another package's file (pandas/core/frame.py), named where its behaviour matters
    return any((root / path).is_file() for root in (REPO, SRC, PACKAGE))


def bare_resolves(name: str) -> bool:
    return any(True for root in ("src", "tests", "bench", "flows", "docker") for _ in (REPO / root).rglob(name)) or (REPO / name).is_file()


def member_resolves(module: str, name: str) -> bool:
    holders = [path for dotted, path in MODULES.items() if dotted.rsplit(".", 1)[-1] == module]
    return not holders or any(name in defined(path) for path in holders)  # not a module of ours: another's (`torch.Tensor`)


def unresolved(text: str) -> list[str]:
    found = [m for m in PATH.findall(text) if not path_resolves(m)]
    found += [m for m in BARE.findall(text) if not bare_resolves(m)]
    found += [m for m in DOTTED.findall(text) if not dotted_resolves(m)]
    found += [f"{m}.{n}" for m, n in MEMBER.findall(text) if not member_resolves(m, n)]
    return found


def test_every_module_a_docstring_comment_or_doc_page_names_exists():
    stale = {str(p.relative_to(REPO)): names for p in read_here() if (names := unresolved(p.read_text()))}
    assert stale == {}, stale


def test_the_names_check_sees_a_renamed_module():
    """The patterns catch what a rename leaves behind, and pass what is not a module of ours."""
    assert unresolved("from `influence.py`; `algos/influence.py`, src/grpolab/variants.py, grpolab.influence.TracIn, "
                      "(trainer.py), `tracin.Record`") == [
        "algos/influence.py", "src/grpolab/variants.py", "influence.py", "trainer.py", "grpolab.influence.TracIn", "tracin.Record"]
    assert unresolved("`grpolab.stage` tag; logger `grpolab.stage.train`; pandas/core/frame.py; /tmp/x/y.py; "
                      "`train.reward_file: my_reward.py`; `torch.Tensor`; `tracin.TracIn`; src/grpolab/trainer/update.py; "
                      "grpolab.runtime.failures.USER_ERRORS; tests/lab.py; `recorder.py`; src/grpolab.egg-info") == []
