"""Loading one tensor at a time: the same model as transformers' loader gives, or transformers' loader itself."""

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lorafit.models.loading import load_config, load_model_and_tokenizer
from lorafit.models.quantized_load import file_dtype, load_tensor_by_tensor


def test_a_bf16_load_of_an_fp32_folder_is_transformers_own_bf16_load(tiny_chat_model):
    assert file_dtype(tiny_chat_model) == torch.float32
    ours, _ = load_model_and_tokenizer(tiny_chat_model, dtype="bfloat16", device="cpu")
    theirs = AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == reference.keys()
    assert all(torch.equal(mine[k], reference[k]) for k in reference)
    assert ours.name_or_path == str(tiny_chat_model)
    assert ours.generation_config.eos_token_id == theirs.generation_config.eos_token_id
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


def test_a_folder_with_other_tensor_names_is_left_to_transformers(tmp_path, tiny_chat_model):
    for item in tiny_chat_model.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert load_tensor_by_tensor(tmp_path, load_config(tmp_path), None, torch.bfloat16, torch.device("cpu")) is None
    model, _ = load_model_and_tokenizer(tmp_path, dtype="bfloat16", device="cpu")  # transformers' loader, which warns
    assert model.dtype == torch.bfloat16


def test_a_folder_whose_shapes_differ_from_its_config_is_refused_as_transformers_refuses_it(tmp_path, tiny_chat_model):
    import json

    import pytest

    from lorafit.errors import LorafitError

    for item in tiny_chat_model.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 48  # the file's MLP weights are 64 wide
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_tensor_by_tensor(tmp_path, load_config(tmp_path), None, torch.bfloat16, torch.device("cpu")) is None
    with pytest.raises(LorafitError, match="weight shapes do not match config.json"):
        load_model_and_tokenizer(tmp_path, dtype="bfloat16", device="cpu")
