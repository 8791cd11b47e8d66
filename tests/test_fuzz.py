"""Fuzzing the loaders: random bytes and random JSON never crash with anything but LorafitError."""

import json
import string

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import lorafit
from lorafit.data.records import load_examples
from lorafit.errors import LorafitError
from tests.conftest import randomize_adapters, tiny_llama

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)
# Records that look like the real shapes, with random values in them, reach deeper than pure noise.
plausible_records = st.fixed_dictionaries({}, optional={
    "messages": json_values | st.lists(st.fixed_dictionaries({}, optional={
        "role": st.sampled_from(["user", "assistant", "system", "tool", 3]), "content": json_values}), max_size=4),
    "conversations": json_values, "instruction": json_values, "input": json_values, "output": json_values,
    "prompt": json_values, "completion": json_values, "text": json_values, "system": json_values,
})

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_as_a_data_file(tmp_path, data):
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    try:
        conversations = load_examples(path)
    except LorafitError:
        return
    assert all(isinstance(c, list) and c for c in conversations)


@FUZZ
@given(records=st.lists(plausible_records | json_values, min_size=0, max_size=4), as_list=st.booleans())
def test_random_json_records(tmp_path, records, as_list):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records) if as_list else "".join(json.dumps(r) + "\n" for r in records))
    try:
        conversations = load_examples(path)
    except LorafitError:
        return
    for conversation in conversations:
        for message in conversation:
            assert isinstance(message["content"], str) and message["role"] in ("system", "user", "assistant", "text")


def _saved_adapter(folder):
    model = tiny_llama()
    lorafit.attach(model, lorafit.LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_adapters(model)
    lorafit.save_adapter(model, folder)
    return folder


config_values = st.fixed_dictionaries({"peft_type": st.sampled_from(["LORA", "IA3", None, 1])}, optional={
    "r": json_values | st.integers(-3, 40), "lora_alpha": json_values | st.floats(-5, 50),
    "target_modules": json_values | st.lists(st.sampled_from(["q_proj", "v_proj", "x", ""]), max_size=3),
    "lora_dropout": json_values, "layers_to_transform": json_values, "layers_pattern": json_values,
    "rank_pattern": json_values, "alpha_pattern": json_values, "use_rslora": json_values,
    "exclude_modules": json_values, "bias": json_values, "use_dora": json_values, "modules_to_save": json_values,
})


@FUZZ
@given(config=config_values | json_values)
def test_random_adapter_config(tmp_path, config):
    folder = _saved_adapter(tmp_path / "adapter")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    try:
        lorafit.load_adapter(tiny_llama(), folder)
    except LorafitError:
        pass


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes_as_adapter_weights(tmp_path, data):
    folder = _saved_adapter(tmp_path / "adapter")
    (folder / "adapter_model.safetensors").write_bytes(data)
    try:
        lorafit.load_adapter(tiny_llama(), folder)
    except LorafitError:
        pass


@FUZZ
@given(tensors=st.dictionaries(
    st.sampled_from(["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                     "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
                     "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight",
                     "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight",
                     "base_model.model.model.embed_tokens.base_layer.weight", "x"])
    | st.text(string.ascii_letters + "._", min_size=1, max_size=30),
    st.lists(st.integers(0, 40), min_size=0, max_size=3), max_size=6))
def test_random_tensor_names_and_shapes(tmp_path, tensors):
    folder = _saved_adapter(tmp_path / "adapter")
    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, folder / "adapter_model.safetensors")
    try:
        lorafit.load_adapter(tiny_llama(), folder)
    except LorafitError:
        pass
