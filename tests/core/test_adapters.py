"""Several named adapters on one model: add, switch, disable, delete, unload."""

import pytest
import torch

import lorafit
from lorafit import LoraConfig, LorafitError
from lorafit.methods.lora import LoraLinear
from tests.conftest import randomize_adapters, tiny_llama, two_adapter_model


def test_attach_returns_the_same_model_and_activates_the_new_adapter():
    model = tiny_llama()
    assert lorafit.attach(model, LoraConfig()) is model
    assert lorafit.adapter_names(model) == ["default"] and lorafit.active_adapters(model) == ["default"]


def test_switching_adapters_changes_outputs_and_trainable_parameters(input_ids):
    model = two_adapter_model()
    assert lorafit.active_adapters(model) == ["second"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".second") for n in trainable)
    with torch.no_grad():
        second = model(input_ids).logits
        lorafit.set_active_adapter(model, "first")
        first = model(input_ids).logits
        lorafit.set_active_adapter(model, ["first", "second"])
        both = model(input_ids).logits
        with lorafit.disable_adapters(model):
            base = model(input_ids).logits
        after = model(input_ids).logits
    assert not torch.allclose(first, second) and not torch.allclose(both, first)
    assert torch.equal(after, both)  # the context manager restores the adapters
    with torch.no_grad():
        assert torch.equal(base, tiny_llama()(input_ids).logits)


def test_both_active_adapters_add_up_like_two_merges(input_ids):
    model = two_adapter_model()
    lorafit.set_active_adapter(model, ["first", "second"])
    with torch.no_grad():
        unmerged = model(input_ids).logits
        lorafit.merge(model)
        assert (model(input_ids).logits - unmerged).abs().max() <= 1e-5


def test_delete_restores_modules_left_without_adapters(input_ids):
    model = two_adapter_model()
    lorafit.delete_adapter(model, "second")
    assert lorafit.adapter_names(model) == ["first"]
    assert isinstance(model.model.layers[0].self_attn.v_proj, LoraLinear)
    assert not isinstance(model.model.layers[0].self_attn.o_proj, LoraLinear)
    assert "second" not in model.model.layers[0].self_attn.v_proj.lora_A
    lorafit.delete_adapter(model, "first")
    assert not hasattr(model, "lorafit_state")
    assert not any(isinstance(m, LoraLinear) for m in model.modules())


def test_errors_name_the_adapter():
    model = two_adapter_model()
    with pytest.raises(LorafitError, match="already has an adapter named 'first'"):
        lorafit.attach(model, LoraConfig(), "first")
    with pytest.raises(LorafitError, match="no adapter named 'third'; the model has first, second"):
        lorafit.set_active_adapter(model, "third")
    with pytest.raises(LorafitError, match="no adapter named 'third'"):
        lorafit.delete_adapter(model, "third")
    with pytest.raises(LorafitError, match="adapter name must be a non-empty string without dots"):
        lorafit.attach(model, LoraConfig(), "a.b")
    with pytest.raises(LorafitError, match="has no lorafit adapters"):
        lorafit.merge(tiny_llama())
    lorafit.merge(model)
    with pytest.raises(LorafitError, match="merged into the weights"):
        with lorafit.disable_adapters(model):
            pass
    with pytest.raises(LorafitError, match="unmerge it before deleting"):
        lorafit.delete_adapter(model, "second")


def test_pattern_keys_that_match_no_adapted_module_are_errors():
    with pytest.raises(LorafitError, match="rank_pattern key 'o_proj' matches none of the adapted modules"):
        lorafit.attach(tiny_llama(), LoraConfig(target_modules=["q_proj"], rank_pattern={"o_proj": 2}))


def test_unload_gives_back_the_original_modules_even_after_merge(input_ids):
    model = tiny_llama()
    original_q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        expected = model(input_ids).logits
    lorafit.attach(model, LoraConfig())
    randomize_adapters(model)
    lorafit.merge(model)
    lorafit.unload(model)
    assert model.model.layers[0].self_attn.q_proj is original_q
    with torch.no_grad():
        assert (model(input_ids).logits - expected).abs().max() <= 1e-5


def _outputs(model, input_ids, active):
    lorafit.set_active_adapter(model, active)
    with torch.no_grad():
        return model(input_ids).logits


def test_switching_away_from_a_merged_adapter_is_refused(input_ids):
    model = two_adapter_model()
    second, first, both = (_outputs(model, input_ids, a) for a in ("second", "first", ["first", "second"]))
    lorafit.set_active_adapter(model, "first")
    lorafit.merge(model)
    with pytest.raises(LorafitError, match=r"^adapter 'first' is merged into the weights of "
                                           r"model.layers.0.self_attn.q_proj and would keep running with "
                                           r"'second' active; unmerge\(model\) first$"):
        lorafit.set_active_adapter(model, "second")
    with pytest.raises(LorafitError, match=r"keep running with no adapter active; unmerge\(model\) first"):
        lorafit.set_active_adapter(model, [])
    with pytest.raises(LorafitError, match=r"adapter 'first' is merged .* unmerge\(model\) first"):
        lorafit.attach(model, LoraConfig(target_modules=["k_proj"]), "third")
    assert lorafit.active_adapters(model) == ["first"] and lorafit.adapter_names(model) == ["first", "second"]
    with torch.no_grad():  # the refusals changed nothing: still W + first, not W + first + second
        torch.testing.assert_close(model(input_ids).logits, first, atol=1e-5, rtol=0)
    torch.testing.assert_close(_outputs(model, input_ids, ["first", "second"]), both, atol=1e-5, rtol=0)
    lorafit.unmerge(model)
    torch.testing.assert_close(_outputs(model, input_ids, "second"), second, atol=1e-5, rtol=0)


def test_only_active_adapters_can_be_merged(input_ids):
    model = two_adapter_model()
    first, both = _outputs(model, input_ids, "first"), _outputs(model, input_ids, ["first", "second"])
    second = _outputs(model, input_ids, "second")
    with pytest.raises(LorafitError, match=r"^adapter 'first' is not active, so merging it would add it to the "
                                           r"outputs; activate it first \(set_active_adapter\), the active ones "
                                           r"are second$"):
        lorafit.merge(model, adapter_names=["first"])
    assert not any(m.merged_adapters for m in model.modules() if isinstance(m, LoraLinear))
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, second)
    # merging some of the active adapters: the rest keep running unmerged, the sum is the same
    lorafit.set_active_adapter(model, ["first", "second"])
    lorafit.merge(model, adapter_names=["first"])
    assert model.model.layers[0].self_attn.v_proj.merged_adapters == ["first"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, both, atol=1e-5, rtol=0)
    torch.testing.assert_close(_outputs(model, input_ids, "first"), first, atol=1e-5, rtol=0)


def test_a_torch_compiled_model_saves_the_keys_of_the_model_it_compiled(tmp_path, input_ids):
    """attach on torch.compile's wrapper adapts the module it holds: the file's keys carry no `_orig_mod.`, so
    lorafit's plain model and peft load it with the same outputs."""
    from peft import PeftModel

    compiled = torch.compile(tiny_llama(), backend="eager")
    lorafit.attach(compiled, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(compiled)
    with torch.no_grad():
        expected = compiled(input_ids).logits
    lorafit.save_adapter(compiled, tmp_path / "adapter")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert keys and not any("_orig_mod" in key for key in keys)
    plain = lorafit.load_adapter(tiny_llama(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids).logits, expected, atol=1e-5, rtol=0)
        in_peft = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
        torch.testing.assert_close(in_peft(input_ids).logits, expected, atol=1e-5, rtol=0)
    assert lorafit.adapter_names(compiled) == ["default"]  # the wrapper answers for the module it holds
    lorafit.unload(compiled)
    assert not hasattr(compiled._orig_mod, "lorafit_state")


def test_loading_under_a_name_the_model_has_is_refused_and_changes_nothing(tmp_path, input_ids):
    model = two_adapter_model()
    lorafit.save_adapter(model, tmp_path / "second", "second")
    with torch.no_grad():
        before = model(input_ids).logits
    with pytest.raises(LorafitError, match="the model already has an adapter named 'second'"):
        lorafit.load_adapter(model, tmp_path / "second", "second")
    assert lorafit.adapter_names(model) == ["first", "second"] and lorafit.active_adapters(model) == ["second"]
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, before)
