import math
import re
from functools import reduce

import pytest
from ruamel.yaml import YAML

from grpolab import config
from grpolab.errors import ConfigError

from conftest import REPO, grpolab


def test_default_params_file_is_valid_and_matches_model_defaults():
    params = config.load(REPO / "params.yaml")
    assert params == config.Params()


@pytest.mark.parametrize(
    "override, message",
    [
        ("sft.steps=-1", "sft.steps: Input should be greater than or equal to 0"),
        ("sft.stepz=3", "sft.stepz: unknown key"),
        ("nosuch.key=3", "nosuch: unknown key"),
        ("sft.learning_rate=fast", "sft.learning_rate: Input should be a valid number"),
        ("eval.top_p=1.5", "eval.top_p: Input should be less than or equal to 1"),
        ("model.arch=gpt9", "model.arch: Input should be 'llama' or 'qwen2'"),
        ("model.num_heads=3", "model: num_heads (3) must divide hidden_size (128)"),
        ("data.train_files=[a.parquet]", "data.train_files: file not found: a.parquet"),
        ("model.name_or_path=/nonexistent", "model.name_or_path: no Hugging Face model folder"),
        ("seed.x=1", "seed.x: seed is not a section"),
        ("sft.steps", "expected section.key=value"),
        ("data.max_operand=9", "data: num_eval + num_train + num_val + num_sft = 5400 distinct problems, but max_operand=9 "
                               "with operations ['+', '-'] makes only 155: raise max_operand or lower the counts"),
    ],
)
def test_bad_override_names_the_key_and_leaves_params_untouched(tmp_path, override, message):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    before = path.read_bytes()
    with pytest.raises(ConfigError) as err:
        config.apply_overrides([override], path)
    assert message in str(err.value)
    assert path.read_bytes() == before


def test_train_files_need_eval_files(tmp_path):
    (tmp_path / "t.parquet").write_bytes(b"")
    with pytest.raises(ConfigError, match="data: train_files and eval_files go together: set eval_files too"):
        config.validate({"data": {"train_files": [str(tmp_path / "t.parquet")]}})


def test_sft_steps_need_an_sft_set_with_user_files(tmp_path):
    for name in ("t.parquet", "e.parquet"):
        (tmp_path / name).write_bytes(b"")
    raw = {"data": {"train_files": [str(tmp_path / "t.parquet")], "eval_files": [str(tmp_path / "e.parquet")]}}
    with pytest.raises(ConfigError, match="sft.steps: .*data.sft_files"):
        config.validate(raw)
    config.validate({**raw, "sft": {"steps": 0}})


def test_overrides_are_written_with_comments_kept(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    params = config.apply_overrides(["sft.steps=7", "eval.temperature=0.5", "data.operations=['+']"], path)
    assert (params.sft.steps, params.eval.temperature, params.data.operations) == (7, 0.5, ["+"])
    text = path.read_text()
    assert text.startswith("# grpolab params")
    assert config.load(path) == params


def test_unknown_top_level_key_in_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1\ntrainn:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: trainn: unknown key")):
        config.load(path)


def test_cli_rejects_bad_params_before_any_work(project):
    proc = grpolab("run", "-S", "sft.steps=-5", cwd=project, check=False)
    assert proc.returncode == 2
    assert "sft.steps: Input should be greater than or equal to 0" in proc.stderr
    assert not (project / "data").exists() and not (project / "mlflow.db").exists()


def test_flatten_gives_dotted_keys():
    flat = config.flatten(config.Params())
    assert flat["sft.steps"] == config.Params().sft.steps
    assert flat["data.operations"] == ["+", "-"]
    assert all("." in k or k == "seed" for k in flat)


@pytest.mark.parametrize("key", ["train.optim.learning_rate", "train.temperature", "model.lora.alpha"])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_floats_are_rejected_naming_the_key(tmp_path, key, bad):
    yaml = YAML()
    params = yaml.load((REPO / "params.yaml").read_text())
    *parents, name = key.split(".")
    reduce(lambda node, k: node[k], parents, params)[name] = bad  # written as YAML's .inf / .nan
    path = tmp_path / "params.yaml"
    yaml.dump(params, path)
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert key in str(err.value) and "finite" in str(err.value)


OVERRIDES = [
    "train.optim.learning_rate=1e-4",  # a float, not the string '1e-4'
    "sft.learning_rate=3e-5",
    "seed=017",  # Hydra keeps '017' a string (validated as 17), never YAML 1.1's octal 15
    "data.operations=['+']",
    "train.rewards.weights={format: 0.5, answer_match: 1.0}",
    "eval.temperature=0.7",
    "model.name_or_path=null",
]


def test_overrides_write_what_dvc_exp_run_writes_and_keep_the_rest_byte_for_byte(tmp_path):
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    original = (REPO / "params.yaml").read_text()
    ours, dvcs = tmp_path / "ours.yaml", tmp_path / "dvc.yaml"
    ours.write_text(original)
    dvcs.write_text(original)
    params = config.apply_overrides(OVERRIDES, ours)
    dvc_apply_overrides(dvcs, OVERRIDES)

    safe = YAML(typ="safe")
    assert safe.load(ours.read_text()) == safe.load(dvcs.read_text())  # the same params, whichever driver
    assert config.load(ours) == config.load(dvcs) == params
    assert (params.seed, params.train.optim.learning_rate, params.sft.learning_rate) == (17, 1e-4, 3e-5)
    assert params.train.rewards.weights == {"format": 0.5, "answer_match": 1.0}

    changed = [(a, b) for a, b in zip(original.splitlines(), ours.read_text().splitlines()) if a != b]
    assert len(original.splitlines()) == len(ours.read_text().splitlines())
    assert changed == [  # every other line (comments, flow lists, each `null`) as it was
        ("seed: 0", "seed: '017'"),
        ('  operations: ["+", "-"]', "  operations: [+]"),
        ("  learning_rate: 0.003", "  learning_rate: 3.0e-05"),
        ("    weights: null", "    weights: {format: 0.5, answer_match: 1.0}"),
        ("  temperature: 0.8", "  temperature: 0.7"),
    ]
    # read by a YAML 1.1 reader too (PyYAML reads `3e-05` as a string)
    import yaml

    assert yaml.safe_load(ours.read_text())["sft"]["learning_rate"] == 3e-5


@pytest.mark.parametrize("old, value, new", [
    ("train.learning_rate", "0.001", "train.optim.learning_rate"),
    ("train.policy_loss", "gspo", "train.loss.policy.name"),
    ("train.gspo_clip_low", "0.001", "train.loss.policy.clip_low (with train.loss.policy.name: gspo)"),
    ("train.rewards", "{answer_match: 1.0}", "train.rewards.weights"),
    ("train.dynamic_sampling", "true", "train.dynamic_sampling.enable"),
    ("train.tracin.validation", "separate", "train.tracin.validation.name"),
    ("train.tracin.val_batch_size", "8", "train.tracin.validation.val_batch_size"),
    ("train.use_mia_weighted_loss", "true", "train.mia_weighting.use_mia_weighted_loss"),
])
def test_an_old_key_is_refused_with_its_new_name(tmp_path, old, value, new):
    """In params.yaml and in a -S override alike: an old key is never read, and the error says where it went."""
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    with pytest.raises(ConfigError, match=re.escape(f"-S {old}={value}: moved to {new}")):
        config.apply_overrides([f"{old}={value}"], path)
    assert path.read_text() == (REPO / "params.yaml").read_text()
    section, key = old.rsplit(".", 1)
    raw = reduce(lambda node, k: {k: node}, reversed(section.split(".")), {key: YAML(typ="safe").load(value)})
    with pytest.raises(ConfigError, match=re.escape(f"params.yaml: {old}: moved to {new}")):
        config.validate(raw)
    assert set(config.MOVED_KEYS) >= {"train.learning_rate", "train.clip_eps_low", "train.credit_log_every"}


@pytest.mark.parametrize("section, message", [
    ({"mitigation": {"name": "outcome_conditional", "mask_percentile": 50}},
     "train.mitigation.mask_percentile: not a knob of `name: outcome_conditional`"),
    ({"mitigation": {"think_discount": 0.3}}, "train.mitigation.think_discount: not a knob of `name: none`"),
    ({"loss": {"policy": {"name": "ppo", "clip_low": 0.1}}}, "train.loss.policy: name: 'ppo' is none of 'ppo_clip', 'gspo', 'cispo'"),
    ({"dynamic_sampling": {"max_rollout_batches": 8}}, "train.dynamic_sampling.max_rollout_batches: not a knob of `enable: false`"),
    ({"mia_weighting": {"mia_normalize_weights": True}},
     "train.mia_weighting.mia_normalize_weights: not a knob of `use_mia_weighted_loss: false`"),
    ({"rewards": {"overlong_buffer": {"penalty_factor": 0.5}}},
     "train.rewards.overlong_buffer.penalty_factor: not a knob of `enable: false`"),
    ({"rewards": {"overlong_buffer": {"enable": True}}}, "train.rewards.overlong_buffer.len: Field required"),
    ({"tracin": {"validation": {"val_selection": "top"}}}, "train.tracin.validation.val_selection: not a knob of `name: same_batch`"),
    ({"rollout": {"vllm_enforce_eager": True}}, "train.rollout.vllm_enforce_eager: not a knob of `backend: hf`"),
])
def test_a_knob_of_another_option_is_a_type_error_naming_it(section, message):
    with pytest.raises(ConfigError) as err:
        config.validate({"train": section})
    assert f"params.yaml: {message}" in str(err.value).splitlines()


@pytest.mark.parametrize("switch_first", [True, False])
def test_switching_an_option_drops_the_old_options_knobs_in_grpolab_and_dvc_alike(tmp_path, switch_first):
    """params.yaml holds ppo_clip's clip_low 0.1; `-S train.loss.policy.name=gspo` must not keep it as gspo's (both
    losses call the bound clip_low): the switch drops the old option's knobs, and a knob given beside it applies to
    the new option whichever comes first. A study cell's `dvc exp run -S` gets the same change (the deletes spelled out)."""
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    path, dvcs = tmp_path / "params.yaml", tmp_path / "dvc-params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    config.apply_overrides(["train.loss.policy.clip_low=0.1", "train.loss.policy.clip_high=0.3"], path)
    dvcs.write_text(path.read_text())
    overrides = ["train.loss.policy.name=gspo", "train.loss.policy.clip_high=0.001"]
    overrides = overrides if switch_first else overrides[::-1]
    expanded = config.expanded(overrides, path)
    switch = overrides.index("train.loss.policy.name=gspo")  # in their order, the delete right before the switch
    assert expanded == [*overrides[:switch], "~train.loss.policy.clip_low", *overrides[switch:]]  # clip_high is given
    policy = config.apply_overrides(overrides, path).train.loss.policy
    assert policy.knobs() == {"clip_low": 3e-4, "clip_high": 0.001}  # gspo's own lower bound, the upper as given
    dvc_apply_overrides(dvcs, [o if o.startswith("~") else f"++{o}" for o in expanded])  # as a study cell gives them
    assert config.load(dvcs) == config.load(path)
    assert config.expanded(["train.loss.policy.name=gspo"], path) == ["train.loss.policy.name=gspo"]  # no switch: kept
    assert config.apply_overrides(["train.mitigation.name=entropy_masking", "train.mitigation.mask_percentile=50"],
                                  path).train.mitigation.knobs() == {"mask_percentile": 50.0}
    assert config.apply_overrides(["train.mitigation.name=outcome_conditional"], path).train.mitigation.knobs() == {
        "think_discount": 0.5}
