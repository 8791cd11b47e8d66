"""peft-format files: lorafit <-> lorafit round trips and every loading error."""

import json

import pytest
import torch
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
