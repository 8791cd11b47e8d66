"""adapter_per_row: one batch, row i through adapter i, in one forward (lorafit.inference.per_row)."""

import pytest
import torch

import lorafit
from lorafit import LoraConfig, LorafitError
from lorafit.methods.lora import LoraLinear
from tests.conftest import randomize_adapters, tiny_llama, two_adapter_model


def test_adapter_per_row_equals_running_each_row_with_its_own_adapter():
    model = tiny_llama()
    names = ["a", "b", "c"]
    for index, name in enumerate(names):
        lorafit.attach(model, LoraConfig(r=2 + index, alpha=4 * (index + 1), target_modules="all-linear"), name)
    lorafit.attach(model, LoraConfig(r=2, target_modules=["q_proj"]), "only_q")  # touches fewer modules
    randomize_adapters(model, scale=0.3)
    rows = ["b", "a", "only_q", "b", "c"]
    ids = torch.randint(0, 64, (len(rows), 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), lorafit.adapter_per_row(model, rows):
        mixed = model(ids).logits
    with torch.no_grad():
        for row, name in enumerate(rows):
            lorafit.set_active_adapter(model, name)
            torch.testing.assert_close(mixed[row], model(ids[row:row + 1]).logits[0], atol=1e-5, rtol=1e-5)
    assert all(m.row_adapters is None for m in model.modules() if isinstance(m, LoraLinear))


def test_adapter_per_row_reuses_its_stacks_until_a_weight_changes_and_keeps_gradients():
    model = tiny_llama()
    for name in ("a", "b"):
        lorafit.attach(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), name)
    randomize_adapters(model, scale=0.3)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    probe = model.model.layers[0].self_attn.q_proj
    with lorafit.adapter_per_row(model, ["b", "a"]):
        with torch.no_grad():
            first = model(ids).logits
            stacks = probe._row_adapter_cache[1]
            again = model(ids).logits
            assert probe._row_adapter_cache[1] is stacks  # decoding does not re-stack per token
            probe.lora_B["a"].mul_(2.0)  # an in-place update (an optimizer step) invalidates the stacks
            changed = model(ids).logits
            assert probe._row_adapter_cache[1] is not stacks
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(".lora_" in name)
        loss = model(ids).logits.sum()  # with autograd: gradients reach every row's adapter
        loss.backward()
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first[1], changed[1]) and torch.allclose(first[0], changed[0])
    assert probe.lora_A["a"].grad.abs().sum() > 0 and probe.lora_A["b"].grad.abs().sum() > 0
    assert not hasattr(probe, "_row_adapter_cache")


def test_adapter_per_row_errors():
    model = two_adapter_model()
    with pytest.raises(LorafitError, match="no adapter named 'zzz'"):
        with lorafit.adapter_per_row(model, ["first", "zzz"]):
            pass
    with pytest.raises(LorafitError, match="adapter_per_row names 2 adapters for a batch of 3 rows"):
        with lorafit.adapter_per_row(model, ["first", "second"]):
            model(torch.zeros(3, 4, dtype=torch.long))


def test_adapter_per_row_refuses_a_pissa_adapter_whose_residual_base_the_other_rows_would_get():
    model = tiny_llama()
    lorafit.attach(model, LoraConfig(r=2, target_modules=["q_proj"]), "plain")
    lorafit.attach(model, LoraConfig(r=2, target_modules=["q_proj"], init="pissa"), "pissa")
    with pytest.raises(LorafitError, match="adapter 'pissa': adapter_per_row serves plain LoRA adapters only"):
        with lorafit.adapter_per_row(model, ["plain", "pissa"]):
            pass
