"""What grpolab may delete or overwrite: only what it wrote (issue 11, req 1)."""

import shutil
from pathlib import Path

import pytest

from grpolab.clean import clean, pipeline_outputs
from grpolab.runtime.fsutil import OUTPUT_MARKER, output_folder

from conftest import REPO


def test_output_folder_refuses_a_folder_of_the_users(tmp_path):
    mine = tmp_path / "home"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="--out .*home: the folder holds files grpolab did not write"):
        output_folder(mine, "--out")
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]

    new = output_folder(tmp_path / "a" / "new", "--out")  # missing: created and marked
    (new / "summary.md").write_text("old")
    assert output_folder(new, "--out") == new  # ours: reused
    assert (new / OUTPUT_MARKER).is_file() and (new / "summary.md").read_text() == "old"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (output_folder(empty, "--out") / OUTPUT_MARKER).is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="a file, not a folder"):
        output_folder(tmp_path / "file", "--out")


def test_clean_deletes_the_pipeline_outputs_only_and_the_store_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "dvc.yaml", "dvc.yaml")
    outputs = pipeline_outputs()
    assert {"data/train.parquet", "models/trained", "metrics/train_curve.csv", "metrics/mia_roc"} <= set(map(str, outputs))
    for path in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("output")
    users = [tmp_path / "data" / "my_train.parquet", tmp_path / "models" / "my_checkpoint" / "config.json"]
    for path in users:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the user's")
    (tmp_path / "mlflow.db").write_text("runs")
    (tmp_path / "dvc.lock").write_text("lock")

    deleted = clean()
    assert set(deleted) == {*outputs, tmp_path.joinpath("dvc.lock").relative_to(tmp_path)}
    assert not any(p.exists() for p in outputs) and all(p.read_text() == "the user's" for p in users)
    assert (tmp_path / "mlflow.db").is_file()
    assert clean(everything=True) == [tmp_path.joinpath("mlflow.db").relative_to(tmp_path)]
    assert all(p.is_file() for p in users)


def test_one_pipeline_at_a_time_and_the_next_one_removes_what_a_killed_one_left(project):
    import subprocess
    import sys
    import time

    from conftest import grpolab, project_env

    holder = subprocess.Popen(
        [sys.executable, "-c", "from grpolab.workspace import pipeline_lock\nwith pipeline_lock():\n print('held', flush=True)\n"
         " import time; time.sleep(600)"], cwd=project, env=project_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = (project / "params.yaml").read_bytes()
        for command in (["stage", "prepare", "-S", "seed=5"], ["run", "-S", "seed=5"]):
            began = time.monotonic()
            proc = grpolab(*command, cwd=project, check=False)
            assert proc.returncode == 2, proc.stderr
            assert f"grpolab: error: another grpolab pipeline is running in {project}" in proc.stderr
            assert f"(pid {holder.pid})" in proc.stderr and time.monotonic() - began < 60
        assert (project / "params.yaml").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()

    # what a kill -9 in the middle of atomic writes and a checkpoint save leaves behind
    left = [project / "data" / ".train.parquet.x1y2.tmp", project / "models" / ".base.old", project / "metrics" / ".train.json.tmp",
            project / "checkpoints" / "train" / ".staging", project / "checkpoints" / "train" / "logs" / "credit" / ".step_000003.parquet.tmp"]
    kept = [project / "data" / "mine.parquet", project / "data" / ".hidden_but_mine"]
    for path in left + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if path.name in (".staging", ".base.old") else path.write_text("x")
    proc = grpolab("stage", "prepare", "-S", "seed=x", cwd=project, check=False)  # takes the lock, cleans, fails on the value
    assert proc.returncode == 2 and "seed: Input should be a valid integer" in proc.stderr
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)
    assert f"removed {Path('checkpoints/train/.staging')}, left by a killed run" in proc.stderr
