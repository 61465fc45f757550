"""What a work pool costs a study (issue 23, req 5): the smoke study through a Prefect work pool with two
process workers, each in its own clone of the project (two folders for two nodes, one shared DVC cache),
against `grpolab study --jobs 2` in one clone; both run two cells at once and log to the same MLflow server
(on PostgreSQL) with the same Prefect server. Blocks alternate which side goes first; every side of every
block starts from fresh clones and an empty DVC cache, under a study name of its own (so no cell is found
done and no stage comes from another block's cache). The workers are started before a pool side's clock
starts, as a cluster's workers are up before a study is sent to them; they poll the pool every
PREFECT_WORKER_QUERY_SECONDS (Prefect's default, 10 s, unless set).

Prints each block's wall times, the pool's overhead per cell ((pool - local) / cells), and their median and
spread.

    python bench/bench_pool.py [--blocks 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ruamel.yaml import YAML

from common import block_order, spread

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "tests"))  # the real servers the tests start, each on 127.0.0.1 in a temporary folder
from servers import mlflow_server, postgres, prefect_server, serving  # noqa: E402

SMOKE = ROOT / "studies" / "smoke.yaml"
IDENTITY = ["-c", "user.name=grpolab-bench", "-c", "user.email=bench@localhost"]


def sh(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True)


def origin_project(work: Path, names: list[str]) -> tuple[Path, int]:
    """A clone of this repository with one copy of the smoke study per (side, block) name, committed;
    and the number of cells of one study."""
    origin = work / "origin"
    sh(["git", "clone", "-q", str(ROOT), str(origin)], work)
    spec = YAML(typ="safe").load(SMOKE.read_text())
    for name in names:
        with open(origin / "studies" / f"{name}.yaml", "w") as f:
            YAML().dump({**spec, "name": name}, f)
    sh(["git", "add", "studies"], origin)
    sh(["git", *IDENTITY, "commit", "-qm", "bench studies"], origin)
    return origin, len(spec["variants"]) * len(spec["seeds"])


def timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    began = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}; log: {log}")
    return time.perf_counter() - began


def local_side(origin: Path, name: str, block_dir: Path, env: dict[str, str]) -> float:
    clone = block_dir / "local"
    sh(["git", "clone", "-q", str(origin), str(clone)], block_dir)
    return timed([str(BIN / "grpolab"), "study", f"studies/{name}.yaml", "--jobs", "2"], clone, env, block_dir / "local.log")


def pool_side(origin: Path, name: str, block_dir: Path, env: dict[str, str]) -> float:
    cache = block_dir / "shared-dvc-cache"
    clones = {node: block_dir / node for node in ("node-a", "node-b")}
    for clone in clones.values():
        sh(["git", "clone", "-q", str(origin), str(clone)], block_dir)
        sh([str(BIN / "dvc"), "cache", "dir", "--local", str(cache)], clone)
    pool = f"pool-{block_dir.name}"
    sh([str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process", "--overwrite"], clones["node-a"], env)
    sh([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "cell", "--pool", pool], clones["node-a"], env)
    with contextlib.ExitStack() as workers:
        for node, clone in clones.items():
            workers.enter_context(serving([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process", "--limit", "1",
                                           "--name", node], block_dir / f"{node}.log", lambda: True, f"worker {node}",
                                          {**env, "GRPOLAB_PROJECT": str(clone)}))
        time.sleep(5)  # the workers' first poll
        return timed([str(BIN / "grpolab"), "study", f"studies/{name}.yaml", "--pool", pool], origin, env, block_dir / "pool.log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--work", type=Path, help="where the clones and logs go (default: a temporary folder)")
    args = parser.parse_args()
    work = (args.work or Path(tempfile.mkdtemp(prefix="bench-pool-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sides = {"local --jobs 2": local_side, "pool, 2 workers": pool_side}
    names = {(side, b): f"bench-{'pool' if 'pool' in side else 'local'}-{b}" for side in sides for b in range(args.blocks)}
    origin, cells = origin_project(work, list(names.values()))
    with postgres(["mlflow"]) as pg, mlflow_server(f"postgresql://grpolab@{pg}/mlflow", work) as uri, prefect_server(work) as prefect_env:
        env = {**prefect_env, "MLFLOW_TRACKING_URI": uri}
        rows = []
        for b in range(args.blocks):
            times = {}
            for side in block_order(list(sides), b):
                block_dir = work / f"block{b}-{'pool' if 'pool' in side else 'local'}"
                block_dir.mkdir()
                print(f"==> block {b + 1}: {side}", flush=True)
                times[side] = sides[side](origin, names[(side, b)], block_dir, env)
                print(f"    {side}: {times[side]:.1f} s", flush=True)
            rows.append(times)
    local, pooled = [r["local --jobs 2"] for r in rows], [r["pool, 2 workers"] for r in rows]
    overhead = [(p - q) / cells for p, q in zip(pooled, local)]
    print(f"\nthe smoke study ({cells} cells, two at once), wall time in s; work folder {work}")
    print("| block | local --jobs 2 | pool, 2 workers | pool overhead per cell |\n|---|---|---|---|")
    for b, (q, p, o) in enumerate(zip(local, pooled, overhead)):
        print(f"| {b + 1} | {q:.1f} | {p:.1f} | {o:.1f} |")
    print(f"median [min, max]: local {spread(local)}, pool {spread(pooled)}, overhead per cell {spread(overhead)} s, "
          f"ratio pool/local {statistics.median(p / q for p, q in zip(pooled, local)):.3f}")
    worker_poll = os.environ.get("PREFECT_WORKER_QUERY_SECONDS", "10 (Prefect's default)")
    print(f"workers polled every {worker_poll} s; the driver reads Prefect and MLflow every 2 s")


if __name__ == "__main__":
    main()
