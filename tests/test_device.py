"""The device-and-precision policy and the process group, on CPU: models load in their working dtype with
fp32-only buffers kept fp32 (the same as DeepSpeed keeps the policy's), bf16 gradients accumulate in fp32,
and the process group has a backend per device type, as a GPU run's does."""

from pathlib import Path
from typing import get_args

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from grpolab import config
from grpolab.runtime import device
from grpolab.runtime import distributed as dist
from grpolab.config.schema import ModelParams
from grpolab.errors import ConfigError
from grpolab.models import load_model
from grpolab.trainer.engine import deepspeed_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny Qwen2 (RoPE theta 1e6, as Qwen2.5) saved as a user's checkpoint."""
    path = tmp_path_factory.mktemp("qwen2")
    cfg = AutoConfig.for_model("qwen2", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, rope_theta=1e6,
                               tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def test_the_working_dtype_is_fp32_on_cpu_unless_the_knob_says_bf16():
    assert device.device() == torch.device("cpu")
    assert device.working_dtype("auto") == torch.float32
    assert device.working_dtype("bfloat16") == torch.bfloat16 and device.working_dtype("float32") == torch.float32
    assert get_args(ModelParams.model_fields["dtype"].annotation) == device.DTYPE_CHOICES
    with pytest.raises(ConfigError, match="train.deepspeed: bf16: replaced by model.dtype"):
        config.validate({"train": {"deepspeed": {"bf16": True}}})


def _bf16_params(**train) -> config.Params:
    return config.validate({"model": {"dtype": "bfloat16"}, "train": {"prompts_per_step": 2, "group_size": 2,
                                                                      "micro_batch_size": 2, **train}})


def test_models_load_in_their_working_dtype_with_the_buffers_deepspeed_keeps(checkpoint):
    """The KL reference is loaded in bf16 by from_pretrained; DeepSpeed casts the policy's parameters to bf16 and
    keeps its buffers. Both hold RoPE's inv_freq in fp32, so they are the same model (a `.to(bf16)` copy, as
    the reference used to be made, rounds inv_freq and is another model)."""
    import deepspeed

    dist.init()
    reference = load_model(checkpoint, torch.bfloat16)
    policy = load_model(checkpoint, torch.float32)
    engine, *_ = deepspeed.initialize(model=policy, optimizer=torch.optim.AdamW(policy.parameters()),
                                      config=deepspeed_config(_bf16_params(), bf16=True))
    buffers = lambda m: {n: b.dtype for n, b in m.named_buffers()}  # noqa: E731
    assert buffers(engine.module) == buffers(reference) and set(buffers(reference).values()) == {torch.float32}
    assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}
    for (name, p), q in zip(engine.module.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(engine.module(ids).logits, reference(ids).logits)
        cast = load_model(checkpoint).to(torch.bfloat16)
        assert {b.dtype for b in cast.buffers()} == {torch.bfloat16}
        assert not torch.equal(cast(ids).logits, reference(ids).logits)


def test_bf16_gradients_accumulate_in_fp32_over_micro_batches(checkpoint):
    """Two micro-batches on the engine train.deepspeed_config builds under bf16: the gradient the optimizer
    steps with is the fp32 sum of the two bf16 micro-batch gradients, not their bf16 sum."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    dist.init()
    params = _bf16_params(prompts_per_step=2, group_size=2, micro_batch_size=1)
    ds_config = deepspeed_config(params, bf16=True)
    assert ds_config["zero_optimization"]["stage"] == 1 and ds_config["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds_config["gradient_accumulation_steps"] == 4
    policy = load_model(checkpoint, torch.float32)
    engine, *_ = deepspeed.initialize(model=policy, optimizer=torch.optim.AdamW(policy.parameters()), config=ds_config)
    assert engine.get_data_types() == (torch.bfloat16, torch.float32)
    twin = load_model(checkpoint, torch.bfloat16)  # the same bf16 weights, for each micro-batch's gradient alone
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (1, 10), generator=g) for _ in range(4)]
    alone = []
    # computed from the logits, as the trainer's loss is (a loss the engine's forward returns itself gets
    # scaled by 1 / gradient_accumulation_steps in DeepSpeed 0.19.8, scale_wrt_gas=False notwithstanding)
    loss = lambda model, ids: torch.nn.functional.cross_entropy(model(ids).logits[0, :-1].float(), ids[0, 1:])  # noqa: E731
    for ids in batches:
        twin.zero_grad()
        loss(twin, ids).backward()
        alone.append({n: p.grad.clone() for n, p in twin.named_parameters()})
        engine.backward(loss(engine, ids), scale_wrt_gas=False)
    name, weight = "model.layers.0.mlp.down_proj.weight", dict(engine.module.named_parameters())["model.layers.0.mlp.down_proj.weight"]
    accumulated = safe_get_full_grad(weight)
    assert accumulated.dtype == torch.float32
    torch.testing.assert_close(accumulated, sum(a[name].float() for a in alone), rtol=0, atol=0)
    in_bf16 = alone[0][name]
    for a in alone[1:]:
        in_bf16 = in_bf16 + a[name]  # what bf16 accumulation keeps: every partial sum rounded to bf16
    assert not torch.equal(in_bf16.float(), accumulated)
    engine.step()


def test_bf16_at_zero_0_is_refused_naming_the_knob():
    with pytest.raises(ConfigError, match="train.deepspeed.zero_stage: 0 with bf16 .* would accumulate gradients in bf16"):
        deepspeed_config(_bf16_params(deepspeed={"zero_stage": 0}), bf16=True)
    assert deepspeed_config(_bf16_params(deepspeed={"zero_stage": 3}), bf16=True)["zero_optimization"]["stage"] == 3
    fp32 = config.validate({})
    assert deepspeed_config(fp32, bf16=False)["zero_optimization"]["stage"] == 0 and "data_types" not in deepspeed_config(fp32, bf16=False)


def test_processes_beyond_the_nodes_gpus_are_refused_with_the_counts():
    assert device.processes_beyond_gpus(2, 2, "train.num_processes") is None
    assert device.processes_beyond_gpus(4, 2, "train.num_processes") == (
        "train.num_processes: 4 processes on this node but it has 2 GPUs: grpolab runs one process per GPU")
    assert "has 1 GPU:" in device.processes_beyond_gpus(2, 1, "train.num_processes")
    device.check_processes_fit(64, "train.num_processes")  # on the CPU any number of processes runs


def test_the_process_group_has_a_backend_per_device_type():
    """On a GPU, nccl for CUDA tensors and gloo for the CPU tensors grpolab's collectives pass (an nccl-only group
    refuses them); the two-process and two-node tests in test_train.py run every collective helper, with the
    trainer's tensors, in a group initialised this way."""
    assert dist.backend(cuda=True) == "cpu:gloo,cuda:nccl" and dist.backend(cuda=False) == "cpu:gloo"
    dist.init()
    assert torch.distributed.get_backend_config() == "cpu:gloo"
    assert dist.all_gather_cat(torch.tensor([0.5])).tolist() == [0.5] and dist.all_gather_objects(["a"]) == ["a"]


@pytest.mark.parametrize("listed, gpus", [("", []), ("-1", []), (" ", []), ("0,1", ["0", "1"]), ("GPU-a, GPU-b", ["GPU-a", "GPU-b"]),
                                          (None, [str(i) for i in range(torch.cuda.device_count())])])
def test_visible_gpus_reads_cuda_visible_devices_one_way_for_studies_and_stage_tags(monkeypatch, listed, gpus):
    from grpolab.tracking import given_gpus

    if listed is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
    found, source = device.visible_gpus()
    assert found == gpus
    assert source == (f"CUDA_VISIBLE_DEVICES={listed}" if listed is not None else f"{len(gpus)} GPU{'s' if len(gpus) != 1 else ''} visible")
    assert given_gpus() == (",".join(gpus) or "cpu")  # the tag of a stage's runs: what a study handed the cell
