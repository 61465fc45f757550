"""One registry per choice (issue 21, req 3): the params' allowed values are the registry's names, and the
dispatch gives each choice its own function's result."""

import typing

import pandas as pd
import pytest
import torch

from grpolab import config
from grpolab.algos import credit as C
from grpolab.algos.advantages import ADVANTAGE_ESTIMATORS, ADVANTAGE_SCALES, group_advantages
from grpolab.algos.losses import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
from grpolab.algos.mia_weights import MIA_WEIGHT_TRANSFORMS, SCORE_NORMALIZATIONS
from grpolab.algos.tracin import KEEP_RULES, VAL_LOSS_COEFFICIENTS, VAL_SELECTIONS
from grpolab.config import schema, train
from grpolab.config.base import option_members
from grpolab.mia import scores as S
from grpolab.rewards import REWARDS, SCORERS
from grpolab.samplers import Rollout
from grpolab.algos.rollout_correction import CORRECTION_MODES
from grpolab.samplers import SAMPLERS
from grpolab.stages import STAGES
from grpolab.trainer.loss_weights import LossWeighting


def allowed(model, field: str) -> tuple:
    """The values a Literal-typed field accepts (through `list[...]` and `| None`); for a choice among options (a
    discriminated union), the model is the choice and the field its key."""
    def literals(tp) -> tuple:
        if typing.get_origin(tp) is typing.Literal:
            return typing.get_args(tp)
        return tuple(v for arg in typing.get_args(tp) for v in literals(arg))
    members = option_members(model)
    if members:
        return tuple(m.model_fields[field].default for m in members.values())
    return literals(model.model_fields[field].annotation)


@pytest.mark.parametrize("model, field, registry, extra", [
    (schema.MitigationParams, "name", C.MITIGATIONS, ()),
    (schema.MiaParams, "method", S.MIA_METHODS, ("precomputed",)),
    (schema.EvalParams, "mia_methods", S.MIA_METHODS, ()),
    (schema.MiaParams, "normalize", SCORE_NORMALIZATIONS, ()),
    (train.MiaWeightingOn, "mia_weighting_mode", MIA_WEIGHT_TRANSFORMS, ()),
    (schema.LossParams, "scale_rewards", ADVANTAGE_SCALES, ()),
    (schema.LossParams, "advantage_estimator", ADVANTAGE_ESTIMATORS, ()),
    (train.PolicyLossParams, "name", POLICY_LOSSES, ()),
    (schema.LossParams, "kl_estimator", KL_ESTIMATORS, ()),
    (schema.LossParams, "loss_agg_mode", AGGREGATIONS, ()),
    (train.SeparateValidation, "val_selection", VAL_SELECTIONS, ()),
    (train.SeparateValidation, "val_loss", VAL_LOSS_COEFFICIENTS, ()),
    (schema.TracInParams, "keep", KEEP_RULES, ()),
    (schema.RolloutParams, "backend", SAMPLERS, ()),
    (train.VllmRollout, "vllm_importance_sampling_mode", CORRECTION_MODES, ()),
])
def test_allowed_values_are_the_registrys_names(model, field, registry, extra):
    assert allowed(model, field) == (*registry, *extra)


def test_reward_and_scorer_names_are_checked_against_their_registries():
    raw = config.Params().model_dump()
    raw["train"]["rewards"]["weights"] = {"answer_match": 1.0, "nope": 1.0}
    with pytest.raises(Exception, match=f"unknown reward 'nope'; known: {', '.join(sorted(REWARDS))}"):
        config.validate(raw)
    raw = config.Params().model_dump()
    raw["train"]["rewards"]["reward_sources"] = {"mine": "nope"}
    with pytest.raises(Exception, match=f"unknown scorer 'nope'; scorers: {', '.join(SCORERS)}"):
        config.validate(raw)


def test_stage_names_are_the_registrys():
    assert list(STAGES) == ["inputs", "prepare", "sft", "mia", "train", "evaluate", "summary"]


@pytest.mark.parametrize("choice, registry", [(schema.MitigationParams, C.MITIGATIONS), (train.PolicyLossParams, POLICY_LOSSES)])
def test_each_options_knobs_are_its_functions_keyword_arguments_and_described(choice, registry):
    """One way to say "a knob of an option": the option's section holds its knobs (with their defaults and a
    description each), and they are the keyword arguments its function in the registry is called with."""
    import inspect

    for name, member in option_members(choice).items():
        function = registry[name].weights if hasattr(registry[name], "weights") else registry[name]
        taken = list(inspect.signature(function).parameters)
        knobs = list(member().knobs())
        assert taken[len(taken) - len(knobs):] == knobs, name
        assert all(member.model_fields[k].description for k in member.model_fields), name


def _rollout() -> tuple[Rollout, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    classes = torch.tensor([[C.THINK, C.THINK, C.TAG, C.ANSWER, C.ANSWER, 0], [C.THINK, C.TAG, C.ANSWER, 0, 0, 0],
                            [C.OTHER, C.THINK, C.THINK, C.THINK, C.TAG, C.ANSWER]])
    rollout = Rollout(torch.randint(2, 16, (3, 2), generator=g), torch.ones(3, 2, dtype=torch.long),
                      torch.randint(2, 16, (3, 6), generator=g) * mask, mask,
                      -torch.rand(3, 6, generator=g) * 3 * mask, torch.rand(3, 6, generator=g) * 2 * mask)
    return rollout, classes


@pytest.mark.parametrize("name", list(C.MITIGATIONS))
def test_the_dispatch_gives_each_mitigation_its_own_weights(name):
    """LossWeighting.loss_weights picks the mitigation by name with its knob as set: each one's weights are its own
    function's (a dispatch returning ones, or another mitigation's, fails), and differ from plain GRPO's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    knobs = {"think_discount": 0.25, "epsilon": 0.3, "credit_scale": 3.0, "entropy_temp": 0.5, "mask_percentile": 50.0}
    own = {k: v for k, v in knobs.items() if k in option_members(schema.MitigationParams)[name].model_fields}
    params = config.validate({"train": {"mitigation": {"name": name, **own}}})
    rollout, classes = _rollout()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=32))
    variants = LossWeighting(params, pd.DataFrame({"extra_info": [{}]}), tokenizer=None)
    got = variants.loss_weights(rollout, [{}] * 3, classes, model, [torch.tensor([0, 2]), torch.tensor([1])]).token
    mask, logp, entropy = rollout.completion_mask, rollout.token_logp, rollout.token_entropy
    expected = {
        "none": lambda: torch.ones(mask.shape),
        "outcome_conditional": lambda: C.outcome_conditional(classes, mask, 0.25),
        "inverse_logprob": lambda: C.inverse_logprob(logp, mask, 0.3),
        "entropy_weighted": lambda: C.entropy_weighted(entropy, mask, 0.5),
        "entropy_masking": lambda: C.entropy_masking(entropy, mask, 50.0),
        "attention_credit": lambda: C.attention_credit(_attention(model, rollout), classes, mask, 3.0),
    }[name]()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (name == "none") == torch.equal(got, torch.ones(mask.shape))


def _attention(model, rollout: Rollout) -> torch.Tensor:
    from grpolab.trainer.loss_weights import completion_attention

    return completion_attention(model, rollout)


def test_advantage_scales_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])  # groups of 2: (1, 0) and (0, 0)
    assert group_advantages(rewards, 2, "none").tolist() == [0.5, -0.5, 0.0, 0.0]
    torch.testing.assert_close(group_advantages(rewards, 2, "group"), torch.tensor([0.5, -0.5, 0, 0]) / (0.5**0.5 + 1e-6))
    torch.testing.assert_close(group_advantages(rewards, 2, "batch"), torch.tensor([0.5, -0.5, 0, 0]) / (0.5 + 1e-6))


def test_mia_methods_by_name_use_their_span_extras():
    logp = torch.tensor([[-1.0, -3.0, -2.0]])
    mask = torch.ones(1, 3)
    span = S.Span(logp, torch.zeros(1, 3), torch.ones(1, 3), mask, zlib_bytes=torch.tensor([4]),
                  reference_logp=torch.tensor([[-1.0, -1.0, -1.0]]))
    assert S.MIA_METHODS["loss"].score(span, 0.5).item() == -2.0
    assert S.MIA_METHODS["zlib"].score(span, 0.5).item() == -0.5
    assert S.MIA_METHODS["min_k"].score(span, 1 / 3).item() == -3.0
    assert S.MIA_METHODS["reference"].score(span, 0.5).item() == -1.0
    assert {m for m, method in S.MIA_METHODS.items() if method.needs} == {"zlib", "reference"}
