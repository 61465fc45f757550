"""What sharing stages saves: a study against the sum of its cells run one by one (issue 10, req 7).

A study shares within a seed (prepare, sft and mia are the same for every variant of it), so one block
is one seed: the study restricted to that seed (`grpolab study`, its cells DVC experiments in one
project) against each of its cells as its own `grpolab run -S ...` in a fresh project (no cache to
share). Blocks alternate which side goes first. Every side is timed from its command's start to its
end, Prefect's temporary server included (each `grpolab run` starts one, as it would for a user).
Prints the per-block wall times and ratios, their median and spread, and the totals.

The study side logs into the study's own experiment in PROJECT, so after the blocks,
`grpolab study STUDY` in PROJECT finds every cell done and writes the whole study's report.

    python bench/study_cost.py --project DIR [--study studies/credit.yaml] [--seeds 0 1 2]

PROJECT: a committed git + DVC copy of this project (the study side runs there); the one-by-one
side makes its copies of it under PROJECT/.grpolab/cost/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ruamel.yaml import YAML

from common import block_order

BIN = Path(sys.executable).parent


def env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def timed(cmd: list[str], cwd: Path, log: Path) -> float:
    began = time.perf_counter()
    with open(log, "w") as out:
        subprocess.run(cmd, cwd=cwd, env=env(), stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - began


def fresh_copy(project: Path, to: Path) -> Path:
    """The project's tracked files (a `git clone`), as a new git + DVC repo with an empty cache."""
    shutil.rmtree(to, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(project), str(to)], check=True)
    return to


def study_side(project: Path, spec: dict, seed: int, work: Path) -> float:
    one_seed = {**spec, "seeds": [seed]}
    path = work / f"{spec['name']}-seed{seed}.yaml"
    with open(path, "w") as f:
        YAML().dump(one_seed, f)
    return timed([str(BIN / "grpolab"), "study", str(path)], project, work / f"study-seed{seed}.log")


def one_by_one_side(project: Path, spec: dict, seed: int, work: Path) -> float:
    total = 0.0
    for variant in spec["variants"]:
        copy = fresh_copy(project, work / f"{variant['name']}-s{seed}")
        overrides = [*spec.get("base", []), *variant.get("overrides", []), f"seed={seed}"]
        total += timed([str(BIN / "grpolab"), "run", *[f"-S{o}" for o in overrides]], copy, work / f"run-{variant['name']}-s{seed}.log")
        shutil.rmtree(copy)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--study", default="studies/credit.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", help="blocks, one per seed (default: the study's seeds)")
    args = parser.parse_args()
    project = args.project.resolve()
    spec = YAML(typ="safe").load((project / args.study).read_text())
    work = project / ".grpolab" / "cost"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, seed in enumerate(args.seeds or spec["seeds"]):
        sides = {"study": study_side, "one by one": one_by_one_side}
        times = {}
        for side in block_order(list(sides), i):
            print(f"==> block {i + 1} (seed {seed}): {side}", flush=True)
            times[side] = sides[side](project, spec, seed, work)
            print(f"    {side}: {times[side]:.0f} s", flush=True)
        rows.append((seed, times["study"], times["one by one"]))
    ratios = [s / o for _, s, o in rows]
    print(f"\n{spec['name']}: {len(spec['variants'])} variants per seed; wall time of the study vs its cells one by one")
    print("| block (seed) | study (s) | one by one (s) | ratio |\n|---|---|---|---|")
    for (seed, s, o), r in zip(rows, ratios):
        print(f"| {seed} | {s:.0f} | {o:.0f} | {r:.3f} |")
    total_s, total_o = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"| all | {total_s:.0f} | {total_o:.0f} | {total_s / total_o:.3f} |")
    print(f"ratio per block: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}")


if __name__ == "__main__":
    main()
