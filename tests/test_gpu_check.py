"""bench/gpu_check.py as the GPU machine runs it, so that it runs there on the first try and cannot rot here.

That machine's Python (3.12) has torch, transformers 5.17, numpy, pandas, pyarrow and tqdm, an older typing_extensions,
and none of grpolab's stack; `make gpu-wheels` brings the rest as wheels, unpacked there with `pip install --no-deps
--target DIR`, and the check runs as `PYTHONPATH=DIR:src python bench/gpu_check.py`.

What these tests show:
- the run: a fresh virtual environment with transformers 5.17 (and what pip brings for it, an older pydantic
  included), typing_extensions 4.12 and numpy installed in it, and torch, pandas, pyarrow, tqdm and what they require
  seen from the project's .venv (links to those distributions' files only: installing torch would take minutes),
  where deepspeed, msgpack, ruamel.yaml and grpolab do not import; the wheels
  `make gpu-wheels` builds for its Python unpacked with --no-deps --target; then `bench/gpu_check.py --tiny` runs every
  section on CPU, the 2-process one (torchrun, gloo) at ZeRO-1, 2 and 3 included;
- the GPU machine's wheel set (GPU_PYTHON=3.12): built for CPython 3.12 where a build is per version, every
  requirement of every wheel met within the set (or by torch, numpy, packaging, tqdm, which the machine has), and,
  under a Python 3.12 here, the set imports and validates a pydantic model beside typing_extensions 4.12.
What they cannot show: the run under Python 3.12 with torch 2.11's CUDA build and nccl (here Python 3.11, the CPU
build of .venv's torch, gloo) and the GPU figures.
"""

import glob
import json
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

from conftest import BIN, REPO, project_env

GPU_PYTHON = (3, 12)
THE_MACHINES = {"torch", "numpy", "packaging", "tqdm"}  # what a carried wheel may need of the machine's own packages
PER_VERSION = {"pydantic-core", "msgpack"}  # compiled against one CPython's API: the wheel must be that version's
OLD_TYPING_EXTENSIONS = "typing_extensions==4.12.2"  # torch's minimum is 4.10; pydantic_core needs 4.16
GPU_TRANSFORMERS = "transformers==5.17.0"
PIP = ["-m", "pip", "install", "-q", "--disable-pip-version-check"]


def gpu_wheels(python: tuple[int, int], dest: Path) -> dict[str, Path]:
    """`make gpu-wheels` for `python` into dest: the wheels by canonical name."""
    proc = subprocess.run(["make", "-s", "gpu-wheels", f"GPU_PYTHON={python[0]}.{python[1]}", f"WHEELS={dest}"], cwd=REPO,
                          env=project_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in dest.glob("*.whl")}


def venv(path: Path, python: str) -> Path:
    subprocess.run([python, "-m", "venv", str(path)], check=True, timeout=300)
    return path / "bin" / "python"


def run(python: Path, *args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(python), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def requirements(wheel: Path, python: tuple[int, int]) -> list[Requirement]:
    """The wheel's Requires-Dist that apply on Linux x86_64 under CPython `python`, extras left out."""
    with zipfile.ZipFile(wheel) as z:
        text = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    version = f"{python[0]}.{python[1]}"
    env = {"python_version": version, "python_full_version": f"{version}.0", "sys_platform": "linux", "platform_system": "Linux",
           "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "extra": ""}
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines() if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(env)]


def python_at(version: tuple[int, int]) -> str | None:
    """A CPython `version` interpreter on this machine (on PATH, else pyenv's), or None."""
    name = f"python{version[0]}.{version[1]}"
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    for candidate in [*(os.path.join(d, name) for d in os.environ["PATH"].split(os.pathsep)), *sorted(glob.glob(f"{root}/versions/{version[0]}.{version[1]}*/bin/{name}"))]:
        if os.access(candidate, os.X_OK) and subprocess.run([candidate, "-c", ""], capture_output=True).returncode == 0:
            return candidate  # a pyenv shim of a version not selected exits 127
    return None


@pytest.fixture(scope="module")
def wheels_for_the_gpu(tmp_path_factory) -> dict[str, Path]:
    return gpu_wheels(GPU_PYTHON, tmp_path_factory.mktemp("gpu_wheels"))


def test_the_gpu_machines_wheels_are_its_pythons_and_meet_each_others_requirements(wheels_for_the_gpu):
    wheels = wheels_for_the_gpu
    assert set(wheels) >= {"deepspeed", "pydantic", "pydantic-core", "msgpack", "typing-extensions", "ruamel-yaml"}
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]  # as the Makefile asks
    supported = {*cpython_tags(GPU_PYTHON, platforms=platforms), *compatible_tags(GPU_PYTHON, platforms=platforms)}
    cp = f"cp{GPU_PYTHON[0]}{GPU_PYTHON[1]}"
    for name, wheel in wheels.items():
        tags = parse_wheel_filename(wheel.name)[3]
        assert tags & supported, f"{wheel.name} does not install under CPython {GPU_PYTHON}"
        if name in PER_VERSION:
            assert {t.interpreter for t in tags} == {cp}, wheel.name
    versions = {name: parse_wheel_filename(w.name)[1] for name, w in wheels.items()}
    for name, wheel in wheels.items():
        for req in requirements(wheel, GPU_PYTHON):
            needed = canonicalize_name(req.name)
            assert needed in versions or needed in THE_MACHINES, f"{wheel.name} needs {req}, which the wheels lack"
            if needed in versions:
                assert req.specifier.contains(versions[needed], prereleases=True), f"{wheel.name} needs {req}: carried {versions[needed]}"


def test_the_gpu_machines_wheels_import_under_its_python_beside_an_old_typing_extensions(wheels_for_the_gpu, tmp_path):
    python = python_at(GPU_PYTHON)
    if python is None:
        pytest.skip(f"no CPython {GPU_PYTHON} here to import the wheels with")
    bare = venv(tmp_path / "venv", python)
    run(bare, *PIP, OLD_TYPING_EXTENSIONS)
    site = tmp_path / "site"
    run(bare, *PIP, "--no-index", "--no-deps", "--target", str(site), *map(str, wheels_for_the_gpu.values()))
    code = ("import hjson, msgpack, psutil, cpuinfo, einops, ruamel.yaml, typing_extensions, pydantic\n"
            "class M(pydantic.BaseModel):\n    zero_stage: int = 1\n"
            "assert M.model_validate({'zero_stage': 3}).zero_stage == 3 and msgpack.unpackb(msgpack.packb([1])) == [1]\n"
            "print(typing_extensions.__file__)")
    proc = run(bare, "-c", code, env={**os.environ, "PYTHONPATH": str(site)})
    assert proc.stdout.startswith(str(site))  # the carried typing_extensions, ahead of the venv's 4.12


def farm(names: list[str], into: Path, skip: set[str]) -> list[str]:
    """Links in `into` to the files of `names` and of what they require (transitively, on this Python, no extras) as
    the project's .venv has them, distributions in `skip` left out: a folder to put on a bare Python's path that holds
    those packages and nothing else. -> the distributions linked"""
    seen, todo = set(), [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen or name in skip:
            continue
        seen.add(name)
        dist = metadata.distribution(name)
        todo += [canonicalize_name(r.name) for r in map(Requirement, dist.requires or []) if r.marker is None or r.marker.evaluate({"extra": ""})]
        for top in {f.parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            if not (into / top).exists():
                (into / top).symlink_to(dist.locate_file(top))
    return sorted(seen)


def test_the_gpu_check_runs_every_section_in_a_fresh_venv_with_the_gpu_machines_packages_and_the_carried_wheels(tmp_path):
    this = sys.version_info[:2]
    wheels = gpu_wheels(this, tmp_path / "wheels")  # this Python's: the run's packages are .venv's builds for it
    bare = venv(tmp_path / "venv", os.path.join(sys.base_prefix, "bin", f"python{this[0]}.{this[1]}"))
    # transformers 5.17's typer brings a pydantic (2.11) that runs on typing_extensions 4.12, as the GPU machine may
    # have: the carried pydantic, ahead of it on the path, needs the carried typing_extensions
    run(bare, *PIP, GPU_TRANSFORMERS, OLD_TYPING_EXTENSIONS, f"numpy=={metadata.version('numpy')}")
    purelib = Path(run(bare, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    installed = {canonicalize_name(d.metadata["Name"]) for d in metadata.distributions(path=[str(purelib)])}
    (tmp_path / "farm").mkdir()
    linked = farm(["torch", "pandas", "pyarrow", "tqdm"], tmp_path / "farm", skip=installed | set(wheels))
    (purelib / "gpu_machine.pth").write_text(f"{tmp_path / 'farm'}\n")
    assert not {"transformers", "typing-extensions", "deepspeed", "pydantic"} & set(linked)

    env = project_env()
    for key in ("VIRTUAL_ENV", "PYTHONPATH"):
        env.pop(key, None)
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != BIN)
    missing = "for m in ('deepspeed', 'msgpack', 'ruamel.yaml', 'grpolab', 'mlflow'):\n" \
              "    try: __import__(m)\n    except ImportError: pass\n    else: raise SystemExit(m + ' imports')"
    run(bare, "-c", missing, env=env, cwd=tmp_path)  # only the carried wheels bring these
    site = tmp_path / "site"
    run(bare, *PIP, "--no-index", "--no-deps", "--target", str(site), *map(str, wheels.values()))
    # On the CPU (not on a GPU) DeepSpeed JIT-builds its shared-memory comm op, with the carried ninja: into a folder of
    # this test's, as these sources' paths differ from .venv's (a shared build folder would be rebuilt for each in turn).
    env.update(PYTHONPATH=f"{site}{os.pathsep}{REPO / 'src'}", PATH=f"{site / 'bin'}{os.pathsep}{env['PATH']}",
               TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"))

    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([str(bare), str(REPO / "bench/gpu_check.py"), "--tiny", "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text())
    a = report["a_versions_and_collectives"]
    assert a.get("transformers") == GPU_TRANSFORMERS.split("==")[1], proc.stdout[-3000:] + proc.stderr[-3000:]
    assert a["collectives_ok"] and a["backend"] == "cpu:gloo" and a["device"] == "cpu"
    b = report["b_steps_with_gradient_checkpointing"]
    assert [s["step"] for s in b["steps"]] == [1, 2, 3] and b["step1_kl_is_0"] and b["buffers_match"]
    c = report["c_rollouts"]
    assert set(c) >= {"4_rows", "8_rows"} and all(c[k]["sample_tokens_per_s"] > 0 and c[k]["ratio_median"] > 0 for k in ("4_rows", "8_rows"))
    d = report["d_updates"]
    assert all(d[f"micro_batch_{m}"]["tokens_per_s"] > 0 and "mfu" in d[f"micro_batch_{m}"] for m in (2, 4))
    e = report["e_tracin_same_batch"]
    assert e["chunk_tokens"] == 4 * 16 and 0 < e["selected_ratio"] <= 1
    f = report["f_zero_stages_2_processes"]
    for stage in (1, 2, 3):
        assert f[f"zero_{stage}"]["finished"], f[f"zero_{stage}"]
        ranks = f[f"zero_{stage}"]["ranks"]
        # rank 0's completions stop at once, rank 1's run every new token: the ranks decode different lengths
        assert [[s["decoded"] for s in r["steps"]] for r in ranks] == [[1, 1], [8, 8]], ranks
    assert proc.returncode == 0 and "every section ran" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
