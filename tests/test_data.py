"""A user's verl-format parquet: accepted, validated, converted; bad files fail naming file, column, row."""

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grpolab import config
from grpolab.data.schema import read_rl_files
from grpolab.errors import ConfigError, DataError
from grpolab.paths import EVAL_FILE, SFT_FILE, TOKENIZER_DIR, TRAIN_FILE, VAL_FILE
from grpolab.stages.prepare import prepare

from conftest import TINY, grpolab


def verl_rows(start: int, n: int, chat: bool) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        prompt = [{"role": "user", "content": f"{i}+1="}] if chat else f"{i}+1="
        rows.append(
            {
                "data_source": "toy",
                "prompt": prompt,
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": str(i + 1)},
                "extra_info": {"index": i, "difficulty": "easy"},
            }
        )
    return rows


def write(path, rows) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_verl_parquet_is_converted(tmp_path):
    path = write(tmp_path / "train.parquet", verl_rows(0, 5, chat=True))
    df = read_rl_files([path], "train")
    assert list(df.columns) == ["prompt", "ground_truth", "data_source", "extra_info"]
    assert df["ground_truth"].tolist() == ["1", "2", "3", "4", "5"]
    assert df["prompt"][2] == [{"role": "user", "content": "2+1="}]
    assert df["extra_info"][0]["difficulty"] == "easy" and df["extra_info"][0]["split"] == "train"


def test_top_level_ground_truth_and_string_prompts(tmp_path):
    path = write(tmp_path / "t.parquet", [{"prompt": "1+1=", "ground_truth": 2}])
    df = read_rl_files([path], "eval")
    assert df["ground_truth"].tolist() == ["2"] and df["data_source"].tolist() == ["t"]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"question": "x", "ground_truth": "1"}], "missing column `prompt`"),
        ([{"prompt": "x"}], "missing column `reward_model` (with `ground_truth`) or `ground_truth`"),
        ([{"prompt": 5, "ground_truth": "1"}, {"prompt": 6, "ground_truth": "1"}], "row 0: prompt must be a string or a list of chat messages, got int"),
        ([{"prompt": "a", "ground_truth": None}], "row 0: ground_truth is missing (null)"),
        ([{"prompt": "a", "reward_model": {"style": "rule"}}], "row 0: column reward_model must be a dict with a `ground_truth` key"),
        ([{"prompt": [{"role": "user"}], "ground_truth": "1"}], "row 0: prompt message 0 must be a dict with string `role` and `content`"),
        ([{"prompt": "a", "ground_truth": "1", "extra_info": "x"}], "row 0: extra_info must be a dict, got str"),
    ],
)
def test_bad_rows_name_file_column_and_row(tmp_path, rows, message):
    path = write(tmp_path / "bad.parquet", rows)
    with pytest.raises(DataError) as err:
        read_rl_files([path], "train")
    assert str(err.value).startswith(path) and message in str(err.value)


def test_empty_and_unreadable_files(tmp_path):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "ground_truth": pa.array([], pa.string())}), empty)
    with pytest.raises(DataError, match=f"{empty}: file has no rows"):
        read_rl_files([str(empty)], "train")
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(DataError, match=f"{junk}: not a readable parquet file"):
        read_rl_files([str(junk)], "train")


def test_prepare_user_files_with_a_user_checkpoint_tokenizer(in_tmp, tmp_path):
    from grpolab.data.tokenizer import train_tokenizer

    tok = train_tokenizer([f"{i}+1=<answer>{i + 1}</answer>" for i in range(50)], vocab_size=80)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    ckpt = tmp_path / "ckpt"
    tok.save_pretrained(ckpt)
    (ckpt / "config.json").write_text("{}")  # prepare only reads the tokenizer of the checkpoint
    train = write(in_tmp / "my_train.parquet", verl_rows(0, 6, chat=True))
    eval_ = write(in_tmp / "my_eval.parquet", verl_rows(100, 4, chat=False))
    params = config.apply_overrides(
        [f"data.train_files=[{train}]", f"data.eval_files=[{eval_}]", "sft.steps=0", f"model.name_or_path={ckpt}"]
    )
    summary = prepare(params)
    assert summary["data/num_train"] == 6 and summary["data/num_eval"] == 4 and summary["data/num_sft"] == 0
    out = pd.read_parquet(TRAIN_FILE)
    assert out["prompt"][0] == "<user>0+1=<assistant>"  # chat messages rendered by the checkpoint's template
    assert pd.read_parquet(EVAL_FILE)["prompt"][0] == "100+1="
    assert (TOKENIZER_DIR / "tokenizer.json").is_file() and SFT_FILE.is_file()


def test_overlapping_train_and_eval_prompts_are_rejected(in_tmp):
    train = write(in_tmp / "a.parquet", verl_rows(0, 5, chat=False))
    eval_ = write(in_tmp / "b.parquet", verl_rows(3, 5, chat=False))
    params = config.apply_overrides([f"data.train_files=[{train}]", f"data.eval_files=[{eval_}]", "sft.steps=0"])
    with pytest.raises(DataError, match=f"{eval_}: row 0: prompt also appears in the train files"):
        prepare(params)
    assert not TRAIN_FILE.exists() and not EVAL_FILE.exists()


def test_cli_on_malformed_parquet_exits_nonzero_and_writes_nothing(project):
    bad = write(project / "bad.parquet", [{"prompt": "a", "ground_truth": "1"}, {"prompt": None, "ground_truth": "2"}])
    good = write(project / "good.parquet", verl_rows(0, 3, chat=False))
    overrides = [*TINY, f"data.train_files=[{good}]", f"data.eval_files=[{bad}]", "sft.steps=0"]
    proc = grpolab("stage", "prepare", *[f"-S{o}" for o in overrides], cwd=project, check=False)
    assert proc.returncode == 2
    assert f"{bad}: row 1: prompt is missing (null)" in proc.stderr
    assert not (project / "data").exists() or not any((project / "data").iterdir())


def test_validation_split_of_user_files_held_out_or_given(in_tmp):
    train = write(in_tmp / "t.parquet", verl_rows(0, 8, chat=False) + verl_rows(0, 1, chat=False))  # "0+1=" twice
    eval_ = write(in_tmp / "e.parquet", verl_rows(100, 4, chat=False))
    files = [f"data.train_files=[{train}]", f"data.eval_files=[{eval_}]", "sft.steps=0"]
    summary = prepare(config.apply_overrides([*files, "data.num_val=3"]))
    out, val = pd.read_parquet(TRAIN_FILE), pd.read_parquet(VAL_FILE)
    assert summary["data/num_val"] == len(val) and val["prompt"].nunique() == 3
    assert not set(val["prompt"]) & set(out["prompt"]) and len(out) + len(val) == 9  # a repeated prompt moves whole
    assert {x["split"] for x in val["extra_info"]} == {"val"}
    # Your own files without a number: no validation split, every train prompt stays.
    assert prepare(config.apply_overrides(["data.num_val=null"]))["data/num_val"] == 0 and len(pd.read_parquet(TRAIN_FILE)) == 9
    given = write(in_tmp / "v.parquet", verl_rows(50, 5, chat=False))
    assert prepare(config.apply_overrides([f"data.val_files=[{given}]"]))["data/num_val"] == 5
    overlapping = write(in_tmp / "bad_val.parquet", verl_rows(200, 2, chat=False) + verl_rows(101, 1, chat=False))
    with pytest.raises(DataError, match=f"{overlapping}: row 2: prompt also appears in the eval files"):
        prepare(config.apply_overrides([f"data.val_files=[{overlapping}]"]))
    with pytest.raises(ConfigError, match="num_val and val_files exclude each other"):
        config.apply_overrides(["data.num_val=2"])
    with pytest.raises(DataError, match=r"data.num_val: 8 validation prompts to hold out, but the train files have 8 distinct"):
        prepare(config.apply_overrides(["data.val_files=[]", "data.num_val=8"]))


def test_generated_validation_split_leaves_the_other_splits_alone(in_tmp):
    tiny = [o for o in TINY if o.startswith(("data.", "model.vocab"))]
    prepare(config.apply_overrides([*tiny, "data.num_val=0"]))
    before = {f: pd.read_parquet(f) for f in (TRAIN_FILE, EVAL_FILE, SFT_FILE)}
    prepare(config.apply_overrides(["data.num_val=30"]))
    for f, frame in before.items():
        pd.testing.assert_frame_equal(pd.read_parquet(f), frame)
    val = pd.read_parquet(VAL_FILE)
    assert len(val) == 30 and not set(val["prompt"]) & set().union(*(set(f["prompt"]) for f in before.values()))


def test_user_sft_rows_overlapping_train_or_eval_prompts_are_named(in_tmp):
    train = write(in_tmp / "t.parquet", verl_rows(0, 10, chat=False))
    eval_ = write(in_tmp / "e.parquet", verl_rows(100, 4, chat=False))
    sft_rows = [{"prompt": f"{i}+2=", "response": "x"} for i in range(5)]
    for leaked, split in (("3+1=", "train"), ("101+1=", "eval")):
        sft = in_tmp / f"sft_{split}.parquet"
        pd.DataFrame([*sft_rows, {"prompt": leaked, "response": "y"}]).to_parquet(sft)
        params = config.apply_overrides([f"data.train_files=[{train}]", f"data.eval_files=[{eval_}]", f"data.sft_files=[{sft}]",
                                         "model.vocab_size=128"])
        with pytest.raises(DataError, match=f"{sft}: row 5: this SFT prompt is also a {split} prompt"):
            prepare(params)
        assert not TRAIN_FILE.exists() and not SFT_FILE.exists()
