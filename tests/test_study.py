"""Studies: the study file's validation, the report's statistics, and the smoke study end to end
(real DVC experiments, Prefect, an MLflow sqlite store), interrupted by kill -9 and started again."""

import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from mlflow import MlflowClient
from scipy.stats import ttest_rel

from grpolab.cli import build_parser
from grpolab.errors import ConfigError
from grpolab.study.power import detectable_effect, min_detectable_difference, paired_power, seeds_needed
from grpolab.study.report import (
    compare, comparison_metrics, log_comparisons, metric_name, paired_interval, paired_table, report_from_cells, summary_table,
    welch_interval,
)
from grpolab.study.experiments import CELL_MARKER
from grpolab.study.progress import Progress
from grpolab.study.spec import StudySpec, load_study, read_spec

from conftest import BIN, MARKER, REPO, free_port, grpolab, make_project, marked_processes, project_env, run
from servers import http_ok

STUDY = """name: s
base: [sft.steps=5]
variants:
  - name: plain
  - name: masked
    overrides:
      - train.mitigation.name=entropy_masking
      - train.mitigation.mask_percentile=50
seeds: [0, 1]
baseline: plain
"""

def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("  - name: plain\n", "  - name: plain\n    overides: []\n", "variants.0.overides: unknown key"),
        ("  - name: masked\n", "  - name: plain\n", "variants.1.name: duplicate variant name 'plain'"),
        ("seeds: [0, 1]", "seeds: []", "seeds: List should have at least 1 item"),
        ("seeds: [0, 1]", "seeds: [1, 1]", "seeds: a seed is listed twice: [1, 1]"),
        ("baseline: plain", "baseline: plian", "baseline: 'plian' is not a variant (variants: plain, masked)"),
        ("mask_percentile=50\n", "mask_percentil=50\n", "variants.1 (masked): train.mitigation.mask_percentil: not a knob of `name: entropy_masking`"),
        ("mask_percentile=50\n", "mask_percentile=500\n", "variants.1 (masked): train.mitigation.mask_percentile: Input should be less than"),
        ("mask_percentile=50\n", "mask_percentile=[50]\n", "variants.1 (masked): train.mitigation.mask_percentile: Input should be a valid number"),
        ("mask_percentile=50\n", "mask_percentile\n", "variants.1 (masked).overrides: -S train.mitigation.mask_percentile: expected section.key=value"),
        ("mask_percentile=50\n", "mask_percentile=50\n      - seed=3\n", "variants.1 (masked).overrides: -S seed=3: seed is set by the study itself"),
        ("base: [sft.steps=5]", "base: [sft.steps=5, tracking.experiment=x]", "base: -S tracking.experiment=x: tracking is set by the study"),
        ("base: [sft.steps=5]", "base: ['sft.steps=1,2']", "base: -S sft.steps=1,2: a sweep"),
        ("name: s\n", "name: s t\n", "name: String should match pattern"),
        ("- train.mitigation.name=entropy_masking\n      - train.mitigation.mask_percentile=50", "- train.mitigation.name=none",
         "variants 'plain' and 'masked' have the same params"),
    ],
)
def test_bad_study_files_are_rejected_naming_the_file_and_key(tmp_path, old, new, message):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    assert old in STUDY
    path = write(tmp_path, STUDY.replace(old, new))
    with pytest.raises(ConfigError) as err:
        load_study(path, tmp_path / "params.yaml")
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_study_cells_are_dvc_overrides_of_the_project_params(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    study = load_study(write(tmp_path, STUDY), tmp_path / "params.yaml")
    assert [c.name for c in study.cells] == ["plain-s0", "plain-s1", "masked-s0", "masked-s1"]
    masked = study.cells[2]
    assert masked.experiment_name == "s-masked-s0"
    # `++` lets DVC add a key that params.yaml does not spell out (mask_percentile is not in it)
    assert masked.overrides == (
        "++sft.steps=5", "++train.mitigation.name=entropy_masking", "++train.mitigation.mask_percentile=50", "++seed=0",
        "++tracking.experiment=s", "++tracking.study=s", "++tracking.variant=masked",
    )
    assert (masked.params.sft.steps, masked.params.train.mitigation.mask_percentile, masked.params.seed) == (5, 50.0, 0)
    assert (masked.params.tracking.experiment, masked.params.tracking.study, masked.params.tracking.variant) == ("s", "s", "masked")
    assert len({c.params_hash for c in study.cells}) == 4
    for shipped in sorted((REPO / "studies").glob("*.yaml")):
        assert load_study(shipped, REPO / "params.yaml").cells


def test_welch_interval_matches_the_formula():
    a, b = [0.9, 0.8, 0.95], [0.7, 0.75, 0.6]
    diff, low, high = welch_interval(a, b)
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 3
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)  # Welch-Satterthwaite
    from scipy.stats import t

    half = t.ppf(0.975, df) * math.sqrt(va + vb)
    assert diff == pytest.approx(0.2) and (low, high) == pytest.approx((0.2 - half, 0.2 + half))
    assert math.isnan(welch_interval([0.5], [0.4, 0.6])[1])  # one seed: no interval


def test_paired_interval_matches_scipys_paired_t_test():
    # The baselines study's trained greedy success, DAPO and GRPO on seeds 0, 1, 2 (differences +0.020, -0.010, +0.015)
    grpo, dapo = [0.875, 0.730, 0.955], [0.895, 0.720, 0.970]
    mean, low, high = paired_interval(np.subtract(dapo, grpo).tolist())
    expected = ttest_rel(dapo, grpo).confidence_interval(0.95)
    assert mean == pytest.approx(0.025 / 3) and (low, high) == pytest.approx((expected.low, expected.high))
    assert (high - low) / 2 == pytest.approx(0.040, abs=1e-3)  # ± 0.04, where Welch's two samples give ± 0.28:
    assert welch_interval(dapo, grpo)[1:] == pytest.approx((-0.268, +0.285), abs=1e-3)
    # the MIA study's recommended arm against plain (trained loss AUC): the interval excludes 0
    plain, weighted = [0.8023, 0.69695, 0.68805], [0.6719, 0.611, 0.586]
    mean, low, high = paired_interval(np.subtract(weighted, plain).tolist())
    expected = ttest_rel(weighted, plain).confidence_interval(0.95)
    assert (mean, low, high) == pytest.approx((-0.106, expected.low, expected.high), abs=1e-3) and high < 0
    assert paired_interval([0.0, 0.0, 0.0]) == (0.0, 0.0, 0.0)  # the same on every seed: no spread, the point
    assert paired_interval([0.02, 0.02]) == pytest.approx((0.02, 0.02, 0.02))
    assert math.isnan(paired_interval([0.3])[1])  # one seed: no interval


def test_compare_pairs_over_the_shared_seeds_and_falls_back_to_welch_without_two():
    arm = pd.Series({0: 0.80, 1: 0.95, 2: 0.70})
    base = pd.Series({0: 0.50, 1: 0.60, 3: 0.90})
    row = compare(arm, base)  # seeds 0 and 1 in common
    expected = ttest_rel([0.80, 0.95], [0.50, 0.60]).confidence_interval(0.95)
    assert (row["interval"], row["n"], row["diff"]) == ("paired", 2, pytest.approx(0.325))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((expected.low, expected.high))
    assert (row["diff_seed_0"], row["diff_seed_1"]) == pytest.approx((0.3, 0.35)) and "diff_seed_2" not in row
    assert row["sd"] == pytest.approx(np.std([0.3, 0.35], ddof=1))
    assert row["min_detectable"] == pytest.approx(row["sd"] * detectable_effect(2))
    assert (row["welch_low"], row["welch_high"]) == pytest.approx(welch_interval(arm.tolist(), base.tolist())[1:])
    apart = compare(pd.Series({2: 0.8, 3: 0.9}), pd.Series({0: 0.5, 1: 0.7, 4: math.nan}))  # no seed in common
    assert apart["interval"] == "welch" and apart["n"] == 2
    assert (apart["diff"], apart["ci_low"], apart["ci_high"]) == pytest.approx(welch_interval([0.8, 0.9], [0.5, 0.7]))
    assert math.isnan(apart["min_detectable"])


def test_power_of_the_paired_t_test_matches_the_textbook():
    # G*Power's one-sample (paired) t-test, two-sided, alpha 0.05, power 0.8 (Cohen's d = mean difference / sd):
    # d = 0.2 needs 199 pairs (actual power 0.8017), 0.5 needs 34 (0.8078), 0.8 needs 15 (0.8213), 1.0 needs 10 (0.8031)
    for effect, n, achieved in ((0.2, 199, 0.8017), (0.5, 34, 0.8078), (0.8, 15, 0.8213), (1.0, 10, 0.8031)):
        assert seeds_needed(effect, 1.0) == n and seeds_needed(-2 * effect, 2.0) == n
        assert paired_power(effect, n) == pytest.approx(achieved, abs=1e-4) and paired_power(effect, n - 1) < 0.8
    assert detectable_effect(10) == pytest.approx(0.9960, abs=1e-3)
    # three seeds: the noncentral t needs 3.26 sd, where a normal approximation would claim (1.96 + 0.84) / sqrt(3) = 1.62
    assert detectable_effect(3) == pytest.approx(3.264, abs=1e-3) and paired_power(detectable_effect(3), 3) == pytest.approx(0.8)
    assert min_detectable_difference(0.022, 3) == pytest.approx(0.022 * 3.264, abs=1e-4)
    assert min_detectable_difference(0.0, 3) == 0.0 and math.isnan(min_detectable_difference(0.1, 1))
    assert seeds_needed(0.0, 0.1) == math.inf and seeds_needed(0.001, 1.0) == math.inf  # more than MAX_SEEDS
    assert seeds_needed(0.05, 0.0) == 2 and math.isnan(seeds_needed(0.05, math.nan)) and math.isnan(paired_power(1.0, 1))


def test_summary_table_gives_mean_std_seeds_and_the_paired_difference():
    spec = StudySpec(name="s", variants=[{"name": "a"}, {"name": "b"}], seeds=[0, 1, 2], baseline="a")
    label = "trained greedy success"
    cells = pd.DataFrame({
        "variant": ["a"] * 3 + ["b"] * 3, "seed": [0, 1, 2] * 2, "status": ["finished"] * 5 + ["failed"],
        label: [0.5, 0.6, 0.7, 0.8, 0.95, math.nan],
    })
    summary = summary_table(cells, spec).set_index(["variant", "quantity"])  # the other quantities' columns: NaN
    a, b = summary.loc[("a", label)], summary.loc[("b", label)]
    assert (a["n"], a["mean"], a["std"], a["seed_1"]) == (3, pytest.approx(0.6), pytest.approx(0.1), 0.6)
    assert (b["n"], b["mean"], b["seed_0"], b["seed_1"]) == (2, pytest.approx(0.875), 0.8, 0.95) and math.isnan(b["seed_2"])
    # paired over seeds 0 and 1 (b's seed 2 failed): +0.3, +0.35, not the difference of the means (0.275)
    expected = ttest_rel([0.8, 0.95], [0.5, 0.6]).confidence_interval(0.95)
    assert (b["interval"], b["diff_to_baseline"]) == ("paired", pytest.approx(0.325))
    assert (b["ci_low"], b["ci_high"]) == pytest.approx((expected.low, expected.high))
    assert (b["diff_seed_0"], b["diff_seed_1"]) == pytest.approx((0.3, 0.35)) and math.isnan(b["diff_seed_2"])
    assert math.isnan(a["diff_to_baseline"])


def test_a_report_rebuilt_from_its_cells_csv_pairs_the_seeds_and_states_its_power(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text(STUDY.replace("seeds: [0, 1]\n", "  - name: unrun\n    overrides: [train.mitigation.name=inverse_logprob]\nseeds: [0, 1, 2]\n"))
    plain, masked = [0.8023, 0.69695, 0.68805], [0.6719, 0.611, 0.586]
    cells = pd.DataFrame({
        "variant": ["plain"] * 3 + ["masked"] * 3, "seed": [0, 1, 2] * 2, "status": "finished",
        "run_id": [f"run{i}" for i in range(6)], "gpus": "cpu",
        "trained loss": plain + masked, "trained greedy success": [0.87, 0.735, 0.885, 0.83, 0.675, 0.89],
    })
    cells.to_csv(tmp_path / "cells.csv", index=False)
    proc = grpolab("report", str(study), "--cells", str(tmp_path / "cells.csv"), "--out", str(tmp_path / "out"),
                   "--note", "Names of that time.", cwd=tmp_path)
    text = (tmp_path / "out" / "report.md").read_text()
    assert proc.stdout.strip() == text.strip()
    interval = ttest_rel(masked, plain).confidence_interval(0.95)
    assert "| Δ vs `plain` | " in text and f"**-0.106 [{interval.low:+.3f}, {interval.high:+.3f}]** (-0.130, -0.086, -0.102)" in text
    assert "left out: `unrun`" in text and "Names of that time." in text and "6 cells (2 variants × 3 seeds [0, 1, 2])" in text
    assert "| `masked` | trained loss | 3 | 0.023 | -0.106 | 0.073 | 3 | 4 |" in text  # the power section
    paired = pd.read_csv(tmp_path / "out" / "paired.csv").set_index(["variant", "quantity"])
    assert paired.loc[("masked", "trained loss"), "ci_high"] == pytest.approx(interval.high)
    assert set(pd.read_csv(tmp_path / "out" / "summary.csv")["variant"]) == {"plain", "masked"}
    cells.drop(columns="status").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ConfigError, match=r"bad.csv: no column 'status'"):
        report_from_cells(tmp_path / "bad.csv", read_spec(study), tmp_path / "out2")
    args = build_parser().parse_args(["report", "s", "--cells", str(tmp_path / "cells.csv")])
    with pytest.raises(ConfigError, match=r"cells.csv: name the study's file \(studies/NAME.yaml\), not 's'"):
        args.func(args)


def test_the_comparisons_become_mlflow_metrics_of_the_study_run(tmp_path):
    assert metric_name("trained pass@k") == "trained_pass_k" and metric_name("step time (s)") == "step_time_s"
    assert metric_name("trained min_k_plus_plus") == "trained_min_k_plus_plus"
    spec = StudySpec(name="s", variants=[{"name": "plain"}, {"name": "q-inv"}, {"name": "apart"}], seeds=[0, 1, 2, 3], baseline="plain")
    cells = pd.DataFrame({
        "variant": ["plain"] * 3 + ["q-inv"] * 3 + ["apart"], "seed": [0, 1, 2] * 2 + [3], "status": "finished",
        "trained loss": [0.80, 0.70, 0.69, 0.67, 0.61, 0.59, 0.5], "step time (s)": [1.0, 1.1, 1.2, 1.5, 1.4, 1.5, 1.0],
    })
    paired = paired_table(cells, spec)
    metrics = comparison_metrics(paired)
    row = compare(cells[cells["variant"] == "q-inv"].set_index("seed")["trained loss"], cells[cells["variant"] == "plain"].set_index("seed")["trained loss"])
    assert metrics["paired/q-inv/trained_loss/mean"] == pytest.approx(row["diff"]) and metrics["paired/q-inv/trained_loss/n"] == 3
    assert metrics["paired/q-inv/trained_loss/low"] == pytest.approx(row["ci_low"])
    assert metrics["power/q-inv/trained_loss/min_detectable"] == pytest.approx(row["min_detectable"])
    assert "paired/q-inv/step_time_s/high" in metrics and "power/q-inv/step_time_s/min_detectable" not in metrics  # not a headline
    # one seed, none shared: a difference without an interval, under welch/
    assert "welch/apart/trained_loss/mean" in metrics and "welch/apart/trained_loss/low" not in metrics
    # names MLflow takes, read back from a real store as the comparison UI reads them
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("s"), run_name="study-s").info.run_id
    assert log_comparisons(client, run_id, paired) == metrics
    assert client.get_run(run_id).data.metrics == pytest.approx(metrics)


def test_each_running_cell_gets_its_own_gpus(tmp_path, monkeypatch):
    from grpolab.study.local import GpuShare, gpus_needed
    from grpolab.study.run import check_study_options

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    study = load_study(write(tmp_path, STUDY.replace("      - train.mitigation.mask_percentile=50\n",
                                                     "      - train.mitigation.mask_percentile=50\n      - train.num_processes=4\n      - train.micro_batch_size=8\n")),
                       tmp_path / "params.yaml")
    plain0, plain1, masked0, masked1 = study.cells
    assert [gpus_needed(c, None) for c in study.cells] == [1, 1, 4, 4] and gpus_needed(plain0, 2) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a,GPU-b,GPU-c,GPU-d,GPU-e,GPU-f,GPU-g,GPU-h")  # UUIDs pass through as given
    options = check_study_options(study, jobs=2)
    share = GpuShare(options.gpus, options.gpus_per_cell)
    share.take(masked0)
    share.take(plain0)
    assert share.held == {masked0.name: ["GPU-a", "GPU-b", "GPU-c", "GPU-d"], plain0.name: ["GPU-e"]}
    share.give_back(masked0)
    share.take(plain1)
    share.take(masked1)  # two at most at once here, but the share never hands out a GPU twice
    assert share.held[plain1.name] == ["GPU-a"] and share.held[masked1.name] == ["GPU-b", "GPU-c", "GPU-d", "GPU-f"]
    with pytest.raises(ConfigError, match=r"--jobs 3 cells at once with 4 GPUs each need 12 GPUs, and 8 are visible \(CUDA_VISIBLE_DEVICES=GPU-a"):
        check_study_options(study, jobs=3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert check_study_options(study, jobs=3).gpus == []  # no GPU: nothing to hand out, nothing refused
    with pytest.raises(ConfigError, match=r"--jobs: 33 is not between 1 and 32"):
        check_study_options(study, jobs=33)


def test_a_study_for_a_pool_is_refused_before_any_cell_where_its_cells_could_not_run(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from grpolab.study.run import check_study_options

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    study = load_study(write(tmp_path, STUDY), tmp_path / "params.yaml")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        options = check_study_options(study, None, pool="nodes")
        assert options.jobs == 4 and options.gpus == []  # every cell in flight at once; a worker's GPUs are its own
        with pytest.raises(ConfigError, match=r"--gpus-per-cell 2 with --pool nodes: on a pool, a cell has the GPUs of the worker"):
            check_study_options(study, None, gpus_per_cell=2, pool="nodes")
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        with pytest.raises(ConfigError, match=r"--pool nodes: the tracking store is sqlite:///.*, a file on this machine"):
            check_study_options(study, None, pool="nodes")
    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(ConfigError, match=r"--pool nodes: PREFECT_API_URL is not set"):
        check_study_options(study, None, pool="nodes")


def test_a_cell_gets_the_users_untracked_files_its_params_name(tmp_path, monkeypatch):
    """A variant's `train.rewards.reward_file` (the data guide's my_reward.py, which git does not track) is copied into the
    cell's workspace, as every param of USER_FILES is: a DVC experiment's copy holds tracked files only."""
    from grpolab.paths import USER_FILES
    from grpolab.study.experiments import USER_PATH_KEYS, untracked_paths

    assert set(USER_PATH_KEYS) == {key for keys in USER_FILES.values() for key in keys} >= {"train.rewards.reward_file"}
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "tracked_reward.py").write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n    return 0.0\n")
    run(["git", "init", "-q"], tmp_path)
    run(["git", "add", "-A"], tmp_path)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm", "project"], tmp_path)
    (tmp_path / "my_reward.py").write_text((tmp_path / "tracked_reward.py").read_text())
    path = write(tmp_path, STUDY.replace("  - name: plain\n", "  - name: plain\n    overrides: [train.rewards.reward_file=tracked_reward.py]\n")
                 .replace("      - train.mitigation.mask_percentile=50\n", "      - train.mitigation.mask_percentile=50\n      - train.rewards.reward_file=my_reward.py\n"))
    monkeypatch.chdir(tmp_path)  # where the study runs: its params' relative paths are the project's
    study = load_study(path, tmp_path / "params.yaml")
    assert untracked_paths(tmp_path, study.cells) == ["my_reward.py"]  # the committed one is in every copy already
    assert untracked_paths(tmp_path, study.cells[:2]) == []


def test_progress_gates_a_seed_on_its_shared_stages_and_estimates_time_left(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    study = load_study(write(tmp_path, STUDY), tmp_path / "params.yaml")
    plain0, plain1, masked0, masked1 = study.cells
    progress = Progress(study, study.cells, 0, jobs=2, stream=open(os.devnull, "w"))
    assert [progress.ready(c) for c in study.cells] == [True, True, False, False]
    progress.started(plain0)
    progress.stage(plain0, "sft")
    assert not progress.ready(masked0)
    progress.stage(plain0, "train")  # past prepare, sft and mia: DVC's run cache has them
    assert progress.ready(masked0) and not progress.ready(masked1)
    assert progress.time_left() is None and "after the first cell" in progress.line()
    progress.cells[plain0.name].started -= 100  # it took 100 s, 40 of them in the shared stages
    progress.cells[plain0.name].shared_seconds = 40
    progress.finished(plain0, True, tmp_path / "no.log")
    progress.started(plain1)
    left = progress.time_left()  # plain1 (a first cell: 100 s) + masked0/1 (no other cell done yet: 100 - 40 s each), on 2 jobs
    assert left == pytest.approx(110, abs=1)
    assert "1/4 cells done" in progress.line() and "running plain-s1" in progress.line()
    # A study whose seed 0 is already done: seed 0's cells start at once, its shared stages are cached.
    resumed = Progress(study, [plain1, masked0, masked1], 1, jobs=1, stream=open(os.devnull, "w"))
    assert [resumed.ready(c) for c in (plain1, masked0, masked1)] == [True, True, False]


# -- the smoke study end to end ------------------------------------------------------------------

def committed_project(path: Path) -> Path:
    project = make_project(path)
    shutil.copytree(REPO / "studies", project / "studies")
    identity = ["-c", "user.name=grpolab-test", "-c", "user.email=test@localhost"]
    run(["git", "add", "-A"], project)
    run(["git", *identity, "commit", "-qm", "project"], project)
    return project


def complete_parents(client: MlflowClient, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id], "tags.`grpolab.stage` = 'pipeline'")
    return [r for r in runs if r.data.tags.get("grpolab.complete") == "true"]


def cell_processes(project: Path, study: str) -> dict[int, str]:
    """The live processes of `study`'s cells in `project`, by pid, with their parent and command line."""
    found = {}
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(CELL_MARKER, "").startswith(f"{project.resolve()}::{study}/"):
                found[proc.pid] = f"(parent {proc.ppid()}) {' '.join(proc.cmdline())[:150]}"
        except psutil.Error:
            pass
    return found


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The shipped smoke study (2 variants x 2 seeds) run by `grpolab study --jobs 2`, killed with -9 once
    its first cell is done, then started again through the Prefect flow in this process."""
    root = tmp_path_factory.mktemp("smoke")
    project = committed_project(root / "project")
    params_before = (project / "params.yaml").read_bytes()
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")

    marker = f"smoke-{os.getpid()}"
    gpus = {"CUDA_VISIBLE_DEVICES": "3,5"}  # a GPU list given explicitly: each running cell is handed one of them
    first = subprocess.Popen([f"{BIN}/grpolab", "study", "studies/smoke.yaml", "--jobs", "2"], cwd=project,
                             env={**project_env(), MARKER: marker, **gpus},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while not ((project / "mlflow.db").exists() and complete_parents(client, "smoke")):
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
        time.sleep(1)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = int(time.time() * 1000)
    deadline = time.monotonic() + 30  # its cells and Prefect's temporary server die with it
    while (left_after_kill := marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    done_before = {r.data.tags["grpolab.variant"] + "-s" + r.data.tags["grpolab.seed"]: r for r in complete_parents(client, "smoke")}

    # Started again: the flow itself (as a deployment would call it), on Prefect's test server.
    from prefect.testing.utilities import prefect_test_harness

    from grpolab.cli import _load_flow

    env = {**project_env(), **gpus}
    saved = dict(os.environ)
    cwd = os.getcwd()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(project)
    try:
        with prefect_test_harness():
            flow = _load_flow("study")
            text = flow("studies/smoke.yaml", 2)
            from prefect.client.orchestration import get_client
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, TaskRunFilter

            with get_client(sync_client=True) as prefect_client:  # every filter spelled out: this server rejects nulls
                artifacts = prefect_client.read_artifacts(
                    artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["study-smoke"])), flow_run_filter=FlowRunFilter(),
                    task_run_filter=TaskRunFilter(), limit=10, offset=0, sort="CREATED_DESC",
                )
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(saved)
    return {
        "project": project, "client": client, "params_before": params_before, "done_before": done_before,
        "killed_at": killed_at, "text": text, "artifacts": artifacts, "left_after_kill": left_after_kill,
    }


def test_smoke_study_every_cell_in_mlflow_with_names_and_tags(smoke):
    client = smoke["client"]
    experiment = client.get_experiment_by_name("smoke")
    parents = {f"{r.data.tags['grpolab.variant']}-s{r.data.tags['grpolab.seed']}": r for r in complete_parents(client, "smoke")}
    assert set(parents) == {"plain-s0", "plain-s1", "outcome_conditional-s0", "outcome_conditional-s1"}
    for name, run_ in parents.items():
        variant, seed = name.rsplit("-s", 1)
        assert run_.info.run_name == f"{variant} · seed {seed}"
        assert run_.data.tags["grpolab.study"] == "smoke" and run_.info.status == "FINISHED"
        assert "train.steps=3" in run_.data.tags["grpolab.changed_params"]
        # every stage's headline is in the parent, also the stages DVC restored from its cache
        for key in ("data/num_train", "sft/final_loss", "mia/weight_mean", "final/train/reward_mean", "mean/train/step_time",
                    "trained/success_rate", "base/mia/loss/auc"):
            assert key in run_.data.metrics, (name, key)
        assert [m.step for m in client.get_metric_history(run_.info.run_id, "train/reward_mean")] == [1, 2, 3]
    # restored from DVC's run cache (evaluate too where three tiny steps leave the model as it was)
    assert {"prepare", "sft", "mia"} <= set(parents["outcome_conditional-s0"].data.tags["grpolab.reused_stages"].split(", "))
    assert parents["plain-s0"].data.params["train.mitigation.name"] == "none"
    assert parents["outcome_conditional-s1"].data.params["train.mitigation.name"] == "outcome_conditional"
    assert len(parents["plain-s0"].data.metrics) == len(parents["outcome_conditional-s1"].data.metrics)
    # the shared stages ran once per seed (a stage the kill -9 interrupted would be KILLED, not FINISHED)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    finished = pd.Series([r.data.tags["grpolab.stage"] for r in runs if r.info.status == "FINISHED"]).value_counts()
    assert {s: finished.get(s, 0) for s in ("prepare", "sft", "mia")} == {"prepare": 2, "sft": 2, "mia": 2}
    assert finished["train"] >= 4  # train params differ between variants: never shared
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert {r.data.tags.get("grpolab.seed") for r in runs if r.data.tags["grpolab.stage"] == "prepare"} == {"0", "1"}
    # each cell's processes saw the one GPU it was handed (the tag records their CUDA_VISIBLE_DEVICES), and
    # two cells that ran at once never had the same one
    assert {r.data.tags["grpolab.gpus"] for r in parents.values()} <= {"3", "5"}
    trains = [r for r in runs if r.data.tags["grpolab.stage"] == "train" and r.info.status == "FINISHED"]
    for a, b in itertools.combinations(trains, 2):
        if a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time:
            assert a.data.tags["grpolab.gpus"] != b.data.tags["grpolab.gpus"], (a.info.run_id, b.info.run_id)


def test_smoke_study_resumed_only_the_cells_that_had_not_finished(smoke):
    client, project = smoke["client"], smoke["project"]
    assert 1 <= len(smoke["done_before"]) < 4
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    for name, parent in smoke["done_before"].items():
        tree = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert tree and all(r.info.start_time < smoke["killed_at"] for r in tree), name  # nothing of it ran again
    assert not smoke["left_after_kill"]  # the killed run's cells and Prefect server died with it
    assert not (left := cell_processes(project, "smoke")), left
    assert not list((project / ".dvc" / "tmp" / "exps").glob("standalone/tmp*"))
    listed = run([f"{BIN}/dvc", "exp", "ls", "--name-only"], project).stdout.split()
    assert sorted(listed) == ["smoke-outcome_conditional-s0", "smoke-outcome_conditional-s1", "smoke-plain-s0", "smoke-plain-s1"]
    # the user's workspace is as it was
    assert (project / "params.yaml").read_bytes() == smoke["params_before"]
    assert run(["git", "status", "--porcelain"], project).stdout == ""


def test_smoke_study_report_equals_what_mlflow_holds(smoke, tmp_path):
    client, project = smoke["client"], smoke["project"]
    out = project / "reports" / "smoke"
    assert {"report.md", "cells.csv", "summary.csv", "paired.csv", "reward_curves.png", "mia_roc.png"} <= {p.name for p in out.iterdir()}
    assert smoke["text"] == (out / "report.md").read_text()
    assert "| `outcome_conditional` |" in smoke["text"] and "| Δ vs `plain` |" in smoke["text"]
    cells = pd.read_csv(out / "cells.csv")
    assert len(cells) == 4 and set(cells["status"]) == {"finished"}
    for row in cells.itertuples():
        metrics = client.get_run(row.run_id).data.metrics
        assert cells.loc[row.Index, "trained greedy success"] == metrics["trained/success_rate"]
        assert cells.loc[row.Index, "gain over base (greedy)"] == pytest.approx(metrics["trained/success_rate"] - metrics["base/success_rate"])
        assert cells.loc[row.Index, "trained loss"] == metrics["trained/mia/loss/auc"]
        assert cells.loc[row.Index, "step time (s)"] == metrics["mean/train/step_time"]
        gpus = client.get_run(row.run_id).data.tags["grpolab.gpus"]
        assert str(cells.loc[row.Index, "gpus"]) == gpus and f"| {gpus} | `{row.run_id}` |" in smoke["text"]
    summary = pd.read_csv(out / "summary.csv").set_index(["variant", "quantity"])
    plain = cells[cells["variant"] == "plain"]["trained loss"]
    assert summary.loc[("plain", "trained loss"), "mean"] == pytest.approx(plain.mean())
    # Δ: the two arms share seeds 0 and 1, so each is compared with plain seed by seed (scipy's paired t-interval)
    paired = pd.read_csv(out / "paired.csv").set_index(["variant", "quantity"])
    by_seed = cells.set_index(["variant", "seed"])
    for label in ("trained greedy success", "trained loss", "step time (s)"):
        differences = by_seed.loc["outcome_conditional"][label] - by_seed.loc["plain"][label]
        row = paired.loc[("outcome_conditional", label)]
        assert (row["interval"], row["n"], row["diff"]) == ("paired", 2, pytest.approx(differences.mean())), label
        assert (row["diff_seed_0"], row["diff_seed_1"]) == pytest.approx((differences[0], differences[1]))
        if differences.nunique() > 1:
            expected = ttest_rel(by_seed.loc["outcome_conditional"][label], by_seed.loc["plain"][label]).confidence_interval(0.95)
            assert (row["ci_low"], row["ci_high"]) == pytest.approx((expected.low, expected.high)), label
        else:  # the same difference on both seeds (three tiny steps can leave greedy success as it was): the point
            assert row["ci_low"] == row["ci_high"] == pytest.approx(row["diff"]), label
        assert summary.loc[("outcome_conditional", label), "ci_low"] == pytest.approx(row["ci_low"])
    assert "## Power" in smoke["text"] and "| `outcome_conditional` | trained loss | 2 |" in smoke["text"]
    # the study's own MLflow run holds its definition and the report; the report rebuilds from the store alone
    study_run = [r for r in client.search_runs([client.get_experiment_by_name("smoke").experiment_id]) if r.info.run_name == "study-smoke"]
    assert len(study_run) == 1 and study_run[0].info.status == "FINISHED"
    assert {f.path for f in client.list_artifacts(study_run[0].info.run_id, "report")} >= {"report/report.md", "report/cells.csv", "report/paired.csv"}
    # and the paired differences as metrics, for the comparison UI
    metrics = client.get_run(study_run[0].info.run_id).data.metrics
    loss = paired.loc[("outcome_conditional", "trained loss")]
    for end, column in (("mean", "diff"), ("low", "ci_low"), ("high", "ci_high"), ("n", "n")):
        assert metrics[f"paired/outcome_conditional/trained_loss/{end}"] == pytest.approx(loss[column])
    assert metrics["power/outcome_conditional/trained_loss/min_detectable"] == pytest.approx(loss["min_detectable"])
    assert metrics["paired/outcome_conditional/step_time_s/mean"] == pytest.approx(paired.loc[("outcome_conditional", "step time (s)"), "diff"])
    assert not [k for k in metrics if k.startswith(("paired/plain/", "welch/"))]
    grpolab("report", "smoke", "--out", str(tmp_path / "again"), cwd=project)
    assert pd.read_csv(tmp_path / "again" / "cells.csv").equals(cells)
    assert pd.read_csv(tmp_path / "again" / "paired.csv").equals(pd.read_csv(out / "paired.csv"))
    assert (tmp_path / "again" / "report.md").read_text() == smoke["text"]
    # the report is a Prefect artifact of the flow run
    assert any(a.key == "study-smoke" and "| `plain` |" in a.data for a in smoke["artifacts"])


def test_a_failing_cell_is_reported_and_the_study_exits_nonzero(smoke, tmp_path):
    project = smoke["project"]
    broken = (project / "studies" / "smoke.yaml").read_text().replace("name: smoke", "name: broken")
    broken = broken.replace("seeds: [0, 1]", "seeds: [0]").replace(
        "  - name: outcome_conditional\n    overrides: [train.mitigation.name=outcome_conditional]",
        "  - name: too_short\n    overrides: [model.max_length=16]",  # valid params, but the SFT rows do not fit: sft fails
    )
    (tmp_path / "broken.yaml").write_text(broken)
    proc = grpolab("study", str(tmp_path / "broken.yaml"), cwd=project, check=False)
    assert proc.returncode == 1
    assert "FAILED too_short-s0" in proc.stderr and "exceed model.max_length=16" in proc.stderr
    assert "1 cell(s) failed (too_short-s0)" in proc.stderr
    report = (project / "reports" / "broken" / "report.md").read_text()
    assert "- `too_short` seed 0: failed" in report and "| `plain` | 0." in report  # plain came from DVC's cache: every stage


def test_bad_study_file_fails_before_any_cell(tmp_path):
    project = committed_project(tmp_path / "p")
    (project / "bad.yaml").write_text(STUDY.replace("baseline: plain", "baseline: nope"))
    proc = grpolab("study", "bad.yaml", cwd=project, check=False)
    assert proc.returncode == 2 and "grpolab: error: bad.yaml: baseline: 'nope' is not a variant" in proc.stderr
    assert not (project / "mlflow.db").exists() and not (project / ".grpolab").exists()
    # more cells at once than GPU sets: refused before any cell, naming the counts
    env = {**project_env(), "CUDA_VISIBLE_DEVICES": "0,1,2"}
    proc = subprocess.run([f"{BIN}/grpolab", "study", "studies/smoke.yaml", "--jobs", "2", "--gpus-per-cell", "2"], cwd=project,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and ("grpolab: error: --jobs 2 cells at once with 2 GPUs each need 4 GPUs, and 3 are visible "
                                     "(CUDA_VISIBLE_DEVICES=0,1,2)") in proc.stderr, proc.stderr
    proc = subprocess.run([f"{BIN}/grpolab", "study", "studies/smoke.yaml", "--gpus-per-cell", "1"], cwd=project,
                          env={**env, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True)
    assert proc.returncode == 2 and "--gpus-per-cell 1: no GPU is visible (CUDA_VISIBLE_DEVICES=)" in proc.stderr, proc.stderr
    assert not (project / "mlflow.db").exists() and not (project / ".grpolab").exists()


# -- the comparison UI in a real browser ---------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--window-size=3000,1400",
]


class _PageText(HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        self.skip += tag in ("script", "style", "noscript", "svg")

    def handle_endtag(self, tag):
        self.skip -= tag in ("script", "style", "noscript", "svg") and self.skip > 0

    def handle_data(self, data):
        if not self.skip and data.strip():
            self.parts.append(data.strip())


def page_text(url: str, expect: str, profile: Path) -> str:
    """The text of a page once the UI has fetched its data: a fresh browser profile, Chromium's virtual
    time (which waits for pending requests), longer budgets until `expect` shows up."""
    for budget in (5000, 15000, 40000):
        shutil.rmtree(profile, ignore_errors=True)
        html = subprocess.run(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget}", "--dump-dom", url],
            capture_output=True, text=True, timeout=180,
        ).stdout
        parser = _PageText()
        parser.feed(html)
        text = "\n".join(parser.parts)
        if expect in text:
            return text
    raise AssertionError(f"{expect!r} not on {url}:\n{text[:3000]}")


def test_the_comparison_ui_shows_variants_and_headline_metrics_in_a_browser(smoke, tmp_path):
    assert Path(CHROMIUM).is_file(), "Debian's chromium is missing: `make browser` installs it (make test does)"
    project, client = smoke["project"], smoke["client"]
    experiment = client.get_experiment_by_name("smoke").experiment_id
    parents = {r.info.run_name: r for r in complete_parents(client, "smoke")}
    port = free_port()
    ui = subprocess.Popen([f"{BIN}/grpolab", "ui", "--port", str(port)], cwd=project, env=project_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not http_ok(f"http://127.0.0.1:{port}/health"):
            assert ui.poll() is None and time.monotonic() < deadline, "grpolab ui did not come up"
            time.sleep(1)
        # A person opening the experiment (the experiments list links to #/experiments/<id>) in a fresh browser
        # lands on the runs table, with the variants and the headline metrics as columns.
        runs_page = page_text(f"http://127.0.0.1:{port}/#/experiments/{experiment}", "outcome_conditional · seed 1", tmp_path / "a")
        assert "plain · seed 0" in runs_page and "trained/success_rate" in runs_page and "grpolab.variant" in runs_page
        step_time = parents["plain · seed 0"].data.metrics["mean/train/step_time"]
        assert repr(step_time) in runs_page
        # The compare page of two parent runs: their names, params and metrics side by side (its metrics table
        # shows the first rows, alphabetically: the base model's eval and membership metrics).
        ids = json.dumps([parents["plain · seed 0"].info.run_id, parents["outcome_conditional · seed 1"].info.run_id], separators=(",", ":"))
        compare = page_text(f"http://127.0.0.1:{port}/#/compare-runs?runs={ids}&experiments=[\"{experiment}\"]", "base/mia/loss/auc", tmp_path / "b")
        assert "plain · seed 0" in compare and "outcome_conditional · seed 1" in compare and "train.mitigation.name" in compare
        assert str(round(parents["outcome_conditional · seed 1"].data.metrics["base/mia/loss/auc"], 3)) in compare
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
