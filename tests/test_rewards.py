"""Rewards by data_source (verl's default scoring), the user's reward file, and the prompt handling a real
checkpoint needs: stop at every EOS id of its generation config, one BOS under a chat template."""

import pandas as pd
import pytest
import torch

from grpolab import config
from grpolab.data.schema import read_rl_files, render_prompt
from grpolab.data.tokenizer import encode_prompt, load_tokenizer
from grpolab.errors import ConfigError, RewardError
from grpolab.rewards import Judge, Rewarder, RewardFile, gsm8k_answer, last_boxed, math_match, source_means
from grpolab.samplers import stop_ids
from grpolab.samplers.hf import sample

from userfiles import gsm8k_corpus, gsm8k_rows, save_gsm8k, save_qwen2_checkpoint


def rows(source: str, truth: str, n: int = 1) -> list[dict]:
    return [{"prompt": "q", "ground_truth": truth, "data_source": source, "extra_info": {"index": i, "split": "train"}} for i in range(n)]


def rewarder(tmp_path, *overrides: str) -> Rewarder:
    from conftest import REPO

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    return Rewarder(config.overridden(list(overrides), tmp_path / "params.yaml")[1])


def test_auto_routes_gsm8k_math_and_the_arithmetic_task(tmp_path):
    auto = rewarder(tmp_path, "train.rewards.weights={auto: 1.0}")
    cases = [
        ("openai/gsm8k", "42", "Tom has 40 + 2 = 42 apples.\n#### 42", 1.0),
        ("openai/gsm8k", "42", "Tom has 40 + 2 = 43 apples.\n#### 43", 0.0),
        ("openai/gsm8k", "1234", "so #### 1,234", 1.0),  # verl drops the commas
        ("openai/gsm8k", "42", "the answer is 42", 0.0),  # strict: no ####, no answer
        ("HuggingFaceH4/MATH-500", "0.5", "so $x = \\boxed{\\frac{1}{2}}$", 1.0),  # math-verify: 1/2 equals 0.5
        ("lighteval/MATH", "\\boxed{\\frac{1}{2}}", "first \\boxed{3}, then \\boxed{\\dfrac{2}{4}}", 1.0),  # the last box
        ("lighteval/MATH", "\\frac{1}{2}", "\\boxed{\\frac{1}{3}}", 0.0),
        ("arithmetic", "12", "<think>7+5</think><answer>12</answer>", 1.0),
    ]
    for source, truth, completion, expected in cases:
        total, parts = auto(rows(source, truth), [completion], "data")
        assert total.tolist() == parts["auto"].tolist() == [expected], (source, completion)
    flexible = rewarder(tmp_path, "train.rewards.weights={auto: 1.0}", "train.rewards.reward_sources={openai/gsm8k: gsm8k_flexible}")
    assert flexible(rows("openai/gsm8k", "42"), ["the answer is 42."], "data")[0].tolist() == [1.0]
    assert gsm8k_answer("x #### -3.5 and #### 7") == "-3.5" and gsm8k_answer("1, 2 and 3.", "flexible") == "3."  # as verl: compared by value later
    assert last_boxed("\\boxed{\\frac{a}{b}} and \\boxed{x^{2}}") == "x^{2}" and last_boxed("\\boxed{1") is None
    assert math_match("no box here: 0.5", "0.5") == 0.0


def test_a_source_without_scorer_is_named_with_its_file_and_row_before_training(tmp_path):
    train, _ = save_gsm8k(tmp_path / "data")
    frame = pd.read_parquet(train)
    frame.loc[3, "data_source"] = "my/dataset"
    frame.to_parquet(train)
    data = read_rl_files([str(train)], "train")
    with pytest.raises(RewardError) as err:
        rewarder(tmp_path, "train.rewards.weights={auto: 1.0}").check(data.to_dict("records"), "data/train.parquet")
    message = str(err.value)
    assert message.startswith(f"{train}: row 3: data_source 'my/dataset' has no scorer")
    assert "known: arithmetic, openai/gsm8k, lighteval/MATH" in message and "train.rewards.reward_file" in message
    rewarder(tmp_path, "train.rewards.weights={auto: 1.0}", "train.rewards.reward_sources={my/dataset: gsm8k}").check(data.to_dict("records"), "x")


def test_rewards_default_to_auto_for_your_files_and_to_your_reward_file(tmp_path):
    from conftest import REPO

    train, eval_ = save_gsm8k(tmp_path / "data")
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    path = tmp_path / "params.yaml"
    assert config.overridden([], path)[1].train.rewards.weights == {"answer_match": 1.0, "format": 0.1}
    files = [f"data.train_files=[{train}]", f"data.eval_files=[{eval_}]", "sft.steps=0"]
    assert config.overridden(files, path)[1].train.rewards.weights == {"auto": 1.0}
    reward = tmp_path / "reward.py"
    reward.write_text("def compute_score(data_source, completion, ground_truth, extra_info):\n    return 1.0\n")
    assert config.overridden([*files, f"train.rewards.reward_file={reward}"], path)[1].train.rewards.weights == {"reward_file": 1.0}
    for overrides, message in [
        ([f"train.rewards.reward_file={reward}", "train.rewards.weights={auto: 1.0}"], "train.rewards: reward_file: is set but train.rewards.weights does not use it"),
        (["train.rewards.weights={reward_file: 1.0}"], "train.rewards: weights: the reward_file reward needs train.rewards.reward_file"),
        ([f"train.rewards.reward_file={tmp_path}/nope.py"], "no Python file (.py) at"),
        (["train.rewards.reward_sources={x: exact}"], "x: unknown scorer 'exact'"),
        (["train.rewards.reward_sources={x: answer_tag}"], "x: the scorer 'answer_tag' is now 'answer_match'"),
    ]:
        with pytest.raises(ConfigError) as err:
            config.overridden(overrides, path)
        assert message in str(err.value), overrides


def test_your_reward_file_scores_every_row_and_its_errors_name_file_and_row(tmp_path):
    reward = tmp_path / "my_reward.py"
    reward.write_text(
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    if extra_info['index'] == 2:\n"
        "        raise KeyError('answer')\n"
        "    return float(ground_truth in solution_str) + (0.5 if data_source == 'mine' else 0.0)\n"
        "def bad(a, b):\n    return 1\n"
        "def nan(a, b, c, d):\n    return float('nan')\n"
    )
    scored = rewarder(tmp_path, f"train.rewards.reward_file={reward}")
    total, parts = scored(rows("mine", "7", 2), ["it is 7", "it is 8"], "data/train.parquet")
    assert total.tolist() == parts["reward_file"].tolist() == [1.5, 0.5]
    assert scored.success(rows("mine", "7", 1), ["7"], "x") == [1.5]  # eval's success is your function's score
    with pytest.raises(RewardError, match=rf"train.rewards.reward_file: {reward}: compute_score raised KeyError: 'answer' on data/train.parquet: row 2"):
        scored(rows("mine", "7", 3), ["a", "b", "c"], "data/train.parquet")
    with pytest.raises(RewardError, match=r"bad\(a, b\) cannot be called as bad\(data_source, completion, ground_truth, extra_info\)"):
        RewardFile(str(reward), "bad")
    with pytest.raises(RewardError, match=r"no function 'missing'"):
        RewardFile(str(reward), "missing")
    with pytest.raises(RewardError, match=r"nan returned nan on x: row 0; it must return a finite number"):
        RewardFile(str(reward), "nan")(rows("mine", "7")[0], "c", "x")
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module\n")
    with pytest.raises(RewardError, match=rf"train.rewards.reward_file: {broken}: loading it raised ModuleNotFoundError"):
        RewardFile(str(broken), "compute_score")


def save_short_judge(path, context: int = 16):
    """A tiny random Qwen2 judge (one logit) with a `context`-position table and a byte tokenizer (a token per
    character, no BOS), saved without a tokenizer limit: its context is the model's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(["<pad>", *sorted(pre_tokenizers.ByteLevel.alphabet())])}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>").save_pretrained(path)
    cfg = AutoConfig.for_model("qwen2", vocab_size=257, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                               intermediate_size=32, max_position_embeddings=context, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(path)
    return path


def test_the_judge_scores_in_batches_of_its_knob_and_sees_the_end_of_a_long_text(tmp_path):
    path = save_short_judge(tmp_path / "judge")
    texts = ["q: 1+2 <answer>3</answer>", "q <answer>4</answer>", "no answer", "<think>x</think>", "a"]
    one_by_one = [Judge(str(path), batch_size=1)([t])[0] for t in texts]
    for size in (2, 5):
        torch.testing.assert_close(Judge(str(path), batch_size=size)(texts), one_by_one)
    # past the judge's 16 positions the prompt's head is cut, not the completion at the end
    judge = Judge(str(path))
    text = "a long prompt that fills the context: 1+2=? <answer>3</answer>"
    tail = torch.tensor([judge.tokenizer(text)["input_ids"][-16:]])
    assert judge.max_length == 16 and len(judge.tokenizer(text)["input_ids"]) > 16
    assert judge([text]) == pytest.approx([torch.sigmoid(judge.model(input_ids=tail).logits[0, 0]).item()])
    # the knob, by default the rollouts' batch size
    overrides = [f"train.rewards.judge_model={path}", "train.rewards.weights={judge: 1.0}", "train.rollout_batch_size=7"]
    assert rewarder(tmp_path, *overrides).judge.batch_size == 7
    assert rewarder(tmp_path, *overrides, "train.rewards.judge_batch_size=3").judge.batch_size == 3


def test_per_source_means():
    assert source_means(["a", "b", "a"], torch.tensor([1.0, 0.0, 0.0])) == {"a": 0.5, "b": 0.0}


def test_generation_stops_at_every_eos_id_of_the_generation_config(tmp_path):
    frames = [gsm8k_rows(8, "train", 0)]
    path = save_qwen2_checkpoint(tmp_path / "qwen", gsm8k_corpus(*frames))
    from grpolab.models import load_model

    model, tokenizer = load_model(path).eval(), load_tokenizer(str(path))
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert tokenizer.eos_token_id == im_end and stop_ids(model, tokenizer) == sorted({im_end, endoftext})
    # every logit equal but <|endoftext|>'s: greedy decoding picks it at once
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.model.embed_tokens.weight[endoftext] = 1.0  # tied: the head row of <|endoftext|>
        model.model.norm.weight.fill_(1.0)
    prompt = [encode_prompt(tokenizer, "Tom has 3 apples.")]
    stopped = sample(model, prompt, max_new_tokens=8, eos_ids=stop_ids(model, tokenizer), pad_id=tokenizer.pad_token_id)
    assert stopped.completion_ids[0].tolist() == [endoftext] and stopped.lengths == [1]
    running = sample(model, prompt, max_new_tokens=8, eos_ids=[im_end], pad_id=tokenizer.pad_token_id)
    assert running.lengths == [8]  # the tokenizer's EOS alone would not have stopped it


def test_a_chat_template_that_writes_the_bos_gets_no_second_one(tmp_path):
    from tokenizers import processors

    frames = [gsm8k_rows(8, "train", 0)]
    path = save_qwen2_checkpoint(tmp_path / "llama_style", gsm8k_corpus(*frames))
    tokenizer = load_tokenizer(str(path))
    tokenizer.bos_token = "<|endoftext|>"
    bos = tokenizer.bos_token_id
    # a Llama-style tokenizer: it adds BOS itself, and its chat template writes one too
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    text = render_prompt([{"role": "user", "content": "Tom has 3 apples."}], tokenizer)
    assert text.startswith("<|endoftext|><|im_start|>user")
    ids = encode_prompt(tokenizer, text)
    assert ids[0] == bos and ids[1] != bos and ids.count(bos) == 1
    assert encode_prompt(tokenizer, "Tom has 3 apples.")[:2] == [bos, tokenizer("Tom", add_special_tokens=False)["input_ids"][0]]
