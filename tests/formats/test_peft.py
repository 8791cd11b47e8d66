"""peft-format files: lorafit <-> lorafit round trips and every loading error."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorafit
from lorafit import FusedSlices, LoraConfig, LorafitError
from tests.conftest import randomize_adapters, tiny_gpt2, tiny_llama, tiny_neox


def _saved(tmp_path, build=tiny_llama, **config):
    model = build()
    lorafit.attach(model, LoraConfig(**config))
    randomize_adapters(model)
    folder = lorafit.save_adapter(model, tmp_path / "adapter")
    return model, folder


def test_saved_files_use_peft_names_and_shapes(tmp_path):
    _, folder = _saved(tmp_path, r=4, alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])
    tensors = load_file(folder / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (16, 4)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (4, 64)
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 4)
    assert len(tensors) == 2 * 5
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == (4, 8, False)
    assert sorted(config["target_modules"]) == ["embed_tokens", "q_proj", "v_proj"]


@pytest.mark.parametrize("build, config", [
    (tiny_llama, dict(r=4, alpha=8, target_modules="all-linear", rank_pattern={"v_proj": 2}, use_rslora=True)),
    (tiny_llama, dict(target_modules=["q_proj", "v_proj"], layers=[1])),
    (tiny_gpt2, dict(r=4, target_modules=["c_attn", "c_proj"])),
    (tiny_llama, dict(r=4, target_modules=["embed_tokens", "q_proj"])),
    (tiny_neox, dict(r=2, target_modules=["query_key_value"], fused_slices={
        "query_key_value": FusedSlices(names=("q", "k", "v") * 4, sizes=(8,) * 12, adapt=("q", "v"))})),
])
def test_round_trip_gives_identical_outputs_and_tensors(tmp_path, input_ids, build, config):
    model, folder = _saved(tmp_path, build, **config)
    loaded = lorafit.load_adapter(build(), folder)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)
    assert {k: v for k, v in loaded.state_dict().items() if "lora_" in k}.keys() == {
        k for k in model.state_dict() if "lora_" in k}
    for key, value in model.state_dict().items():
        if "lora_" in key:
            assert torch.equal(loaded.state_dict()[key], value), key


def test_loaded_adapter_is_frozen_unless_trainable(tmp_path):
    _, folder = _saved(tmp_path)
    frozen = lorafit.load_adapter(tiny_llama(), folder)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = lorafit.load_adapter(tiny_llama(), folder, trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, _ in trainable.named_parameters() if ".lora_" in n}


def test_layers_selection_is_saved_as_short_names_plus_layers(tmp_path):
    _, folder = _saved(tmp_path, target_modules=["q_proj", "v_proj"], layers=[1])
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["layers_to_transform"] == [1]


def test_saving_writes_no_temporary_files(tmp_path):
    _, folder = _saved(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def _rewrite_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_missing_key_is_named(tmp_path):
    _, folder = _saved(tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, folder / "adapter_model.safetensors")
    model = tiny_llama()
    with pytest.raises(LorafitError, match=r"missing key 'base_model.model.model.layers.1.self_attn.v_proj.lora_B"):
        lorafit.load_adapter(model, folder)
    assert not hasattr(model, "lorafit_state")  # rolled back


def test_unexpected_key_is_named(tmp_path):
    _, folder = _saved(tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(8, 32)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(LorafitError, match=r"unexpected key 'base_model.model.model.layers.0.mlp.up_proj.lora_A"):
        lorafit.load_adapter(tiny_llama(), folder)


def test_adapter_for_another_base_model_names_the_module(tmp_path):
    _, folder = _saved(tmp_path)
    wider = tiny_llama(hidden_size=48, head_dim=8)
    with pytest.raises(LorafitError) as err:
        lorafit.load_adapter(wider, folder)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight has shape (8, 32)" in str(err.value)
    assert "made for another base model" in str(err.value)


def test_unknown_peft_type_and_unsupported_features_are_refused(tmp_path):
    _, folder = _saved(tmp_path)
    _rewrite_config(folder, peft_type="PREFIX_TUNING")
    with pytest.raises(LorafitError, match="peft_type 'PREFIX_TUNING' is not supported"):
        lorafit.load_adapter(tiny_llama(), folder)
    _rewrite_config(folder, peft_type="LORA", lora_bias=True)
    with pytest.raises(LorafitError, match="lora_bias = true is a peft feature lorafit does not support"):
        lorafit.load_adapter(tiny_llama(), folder)
    _rewrite_config(folder, lora_bias=False, r=0)
    with pytest.raises(LorafitError, match="adapter_config.json: r must be an integer >= 1"):
        lorafit.load_adapter(tiny_llama(), folder)


def test_invalid_json_names_the_line(tmp_path):
    _, folder = _saved(tmp_path)
    (folder / "adapter_config.json").write_text('{\n  "r": 8,\n  oops\n}')
    with pytest.raises(LorafitError, match=r"adapter_config.json, line 3: invalid JSON"):
        lorafit.load_adapter(tiny_llama(), folder)


@pytest.mark.parametrize("cut", [10, 200, -50])
def test_truncated_safetensors_is_a_clear_error(tmp_path, cut):
    _, folder = _saved(tmp_path)
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(LorafitError, match="is not a readable safetensors file"):
        lorafit.load_adapter(tiny_llama(), folder)


def test_pickle_adapter_is_refused_unless_allowed(tmp_path, input_ids):
    model, folder = _saved(tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")
    with pytest.raises(LorafitError, match="is a pickle file, which can run code when loaded; refused"):
        lorafit.load_adapter(tiny_llama(), folder)
    loaded = lorafit.load_adapter(tiny_llama(), folder, allow_pickle=True)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(LorafitError, match="does not exist"):
        lorafit.load_adapter(tiny_llama(), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LorafitError, match="has no adapter_config.json"):
        lorafit.load_adapter(tiny_llama(), tmp_path / "empty")


def test_save_needs_a_single_adapter_name_when_several_are_active(tmp_path):
    model = tiny_llama()
    lorafit.attach(model, LoraConfig(), "a")
    lorafit.attach(model, LoraConfig(target_modules=["k_proj"]), "b")
    lorafit.set_active_adapter(model, ["a", "b"])
    with pytest.raises(LorafitError, match="2 adapters are active; name the one to save"):
        lorafit.save_adapter(model, tmp_path / "x")
    lorafit.save_adapter(model, tmp_path / "b", "b")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["target_modules"] == ["k_proj"]


# -- a base embedding weight stored beside the adapter (peft saves one for trained embeddings) ---------
EMBED_BASE_KEY = "base_model.model.model.embed_tokens.base_layer.weight"


def _adapter_with_base_embedding(tmp_path, tie: bool = True):
    """A saved adapter on embed_tokens + q_proj whose file also carries a new embed_tokens base weight."""
    model = tiny_llama(tie_word_embeddings=tie)
    lorafit.attach(model, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    randomize_adapters(model)
    folder = lorafit.save_adapter(model, tmp_path / "adapter")
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors[EMBED_BASE_KEY] = torch.randn(64, 32, generator=torch.Generator().manual_seed(9))
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder, tensors


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def _assert_unchanged(model, snapshot):
    state, requires_grad = snapshot
    assert model.state_dict().keys() == state.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires_grad


@pytest.mark.parametrize("spoil, error", [
    (lambda t: t.update({"base_model.model.bogus.lora_A.weight": torch.zeros(2, 2)}), "unexpected key"),
    (lambda t: t.update({"base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": torch.zeros(4, 31)}),
     "has shape"),
])
def test_failed_load_leaves_the_base_embedding_and_tied_head_unchanged(tmp_path, spoil, error):
    folder, tensors = _adapter_with_base_embedding(tmp_path)
    spoil(tensors)
    save_file(tensors, folder / "adapter_model.safetensors")
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = _snapshot(model)
    with pytest.raises(LorafitError, match=error):
        lorafit.load_adapter(model, folder)
    assert not hasattr(model, "lorafit_state")
    _assert_unchanged(model, before)  # lm_head.weight included: it is in the state dict


def test_failed_load_keeps_the_adapters_already_there_active_and_trainable(tmp_path, input_ids):
    folder, tensors = _adapter_with_base_embedding(tmp_path)
    tensors["base_model.model.bogus.lora_A.weight"] = torch.zeros(2, 2)
    save_file(tensors, folder / "adapter_model.safetensors")
    model = lorafit.attach(tiny_llama(tie_word_embeddings=True), LoraConfig(target_modules=["k_proj"]), "mine")
    randomize_adapters(model)
    before = _snapshot(model)
    with torch.no_grad():
        expected = model(input_ids).logits
    with pytest.raises(LorafitError, match="unexpected key"):
        lorafit.load_adapter(model, folder, "theirs")
    assert lorafit.active_adapters(model) == ["mine"] and lorafit.adapter_names(model) == ["mine"]
    _assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, expected)


def test_failed_slice_layout_check_leaves_the_base_embedding_unchanged(tmp_path):
    slices = FusedSlices(names=("q", "k", "v") * 4, sizes=(8,) * 12, adapt=("q", "v"))
    model = tiny_neox()
    lorafit.attach(model, LoraConfig(r=2, target_modules=["embed_in", "query_key_value"],
                                     fused_slices={"query_key_value": slices}))
    randomize_adapters(model)
    folder = lorafit.save_adapter(model, tmp_path / "adapter")
    path = folder / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()  # the slice layout: without it the file loads as a plain LoRA
    tensors = load_file(path)
    tensors["base_model.model.gpt_neox.embed_in.base_layer.weight"] = torch.randn(64, 32)
    b_key = "base_model.model.gpt_neox.layers.1.attention.query_key_value.lora_B.weight"
    tensors[b_key][8, 0] = 1.0  # row 8 is head 0's k: not an adapted slice
    save_file(tensors, path, metadata=metadata)
    target = tiny_neox()
    before = _snapshot(target)
    with pytest.raises(LorafitError, match="non-zero entries outside the adapted slices"):
        lorafit.load_adapter(target, folder)
    _assert_unchanged(target, before)


def test_loaded_base_embedding_is_used_and_unload_gives_back_the_original(tmp_path, input_ids):
    folder, tensors = _adapter_with_base_embedding(tmp_path)
    model = tiny_llama(tie_word_embeddings=True)
    before = _snapshot(model)
    with torch.no_grad():
        original_logits = model(input_ids).logits
    lorafit.load_adapter(model, folder)
    assert torch.equal(model.model.embed_tokens.base_layer.weight, tensors[EMBED_BASE_KEY])
    assert torch.equal(model.lm_head.weight, tensors[EMBED_BASE_KEY])  # tied: the head follows
    assert "model.embed_tokens.original_base_weight" not in model.state_dict()  # kept out of the files
    lorafit.unload(model)
    _assert_unchanged(model, (before[0], {n: False for n in before[1]}))  # unload keeps the model frozen
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, original_logits)


def test_deleting_the_adapter_gives_back_the_base_embedding_it_brought(tmp_path):
    folder, tensors = _adapter_with_base_embedding(tmp_path)
    model = tiny_llama(tie_word_embeddings=True)
    original = model.model.embed_tokens.weight.detach().clone()
    lorafit.attach(model, LoraConfig(target_modules=["embed_tokens"]), "other")  # keeps the wrapper alive
    lorafit.load_adapter(model, folder, "loaded")
    wrapper = model.model.embed_tokens
    assert torch.equal(wrapper.base_layer.weight, tensors[EMBED_BASE_KEY])
    lorafit.delete_adapter(model, "loaded")
    assert model.model.embed_tokens is wrapper and wrapper.adapter_names == ["other"]
    assert torch.equal(wrapper.base_layer.weight, original) and torch.equal(model.lm_head.weight, original)
    lorafit.load_adapter(model, folder, "again")
    lorafit.delete_adapter(model, "other")
    assert torch.equal(wrapper.base_layer.weight, tensors[EMBED_BASE_KEY])  # still the file's: "again" owns it
    lorafit.delete_adapter(model, "again")
    assert torch.equal(model.model.embed_tokens.weight, original)


def test_a_second_base_embedding_and_deleting_its_owner_under_a_merge_are_refused(tmp_path):
    folder, _ = _adapter_with_base_embedding(tmp_path, tie=False)
    model = lorafit.load_adapter(tiny_llama(), folder, "first")
    replaced = model.model.embed_tokens.base_layer.weight.detach().clone()
    with pytest.raises(LorafitError, match=r"would replace the base weight of model.embed_tokens, which adapter "
                                           r"'first' already replaced from its file; delete that adapter first"):
        lorafit.load_adapter(model, folder, "second")
    assert lorafit.adapter_names(model) == ["first"]
    assert torch.equal(model.model.embed_tokens.base_layer.weight, replaced)

    lorafit.attach(model, LoraConfig(target_modules=["embed_tokens"]), "other")
    lorafit.set_active_adapter(model, ["first", "other"])
    lorafit.merge(model, adapter_names=["other"])
    with pytest.raises(LorafitError, match=r"adapter 'first' brought the base weight of model.embed_tokens, into "
                                           r"which 'other' is merged; unmerge\(model\) before deleting it"):
        lorafit.delete_adapter(model, "first")
    assert lorafit.adapter_names(model) == ["first", "other"]  # refused before any module lost it
    assert "first" in model.model.layers[0].self_attn.q_proj.lora_A


@pytest.mark.parametrize("text, error", [
    ('{"peft_type": "LORA", "r": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON nested too deeply to read"),
    ('{"peft_type": "LORA", "r": 1' + "0" * 4999 + "}", r"unreadable JSON value \(Exceeds the limit"),
])
def test_json_python_cannot_read_is_one_line_naming_the_file(tmp_path, text, error):
    _, folder = _saved(tmp_path)
    (folder / "adapter_config.json").write_text(text)
    with pytest.raises(LorafitError, match=rf"{folder / 'adapter_config.json'}: {error}") as err:
        lorafit.load_adapter(tiny_llama(), folder)
    assert "\n" not in str(err.value)
