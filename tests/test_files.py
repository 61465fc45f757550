"""What grpolab may delete or overwrite: only what it wrote (issue 11, req 1)."""

import shutil

import pytest

from grpolab.clean import clean, pipeline_outputs
from grpolab.fsutil import OUTPUT_MARKER, output_folder

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
