"""A base model's identity: the same weights in another dtype match, other weights or shapes do not."""

from pathlib import Path

import pytest
import torch

import lorafit
from lorafit.models.identity import base_identity, fingerprint, loadable_spec, mismatch, model_spec
from tests.conftest import tiny_llama


def test_the_same_weights_in_bf16_or_fp16_are_the_same_base():
    recorded = fingerprint(tiny_llama(seed=0))
    assert mismatch(recorded, tiny_llama(seed=0).to(torch.bfloat16)) is None
    assert mismatch(recorded, tiny_llama(seed=0).to(torch.float16)) is None


def test_other_weights_of_the_same_shapes_are_another_base():
    assert "same shapes but other weights" in mismatch(fingerprint(tiny_llama(seed=0)), tiny_llama(seed=1))


def test_other_shapes_name_a_weight_both_have():
    message = mismatch(fingerprint(tiny_llama()), tiny_llama(hidden_size=48))
    assert message.startswith("weight shapes differ (") and "[64, 32] there, [64, 48] here" in message


def test_another_architecture_says_so():
    from tests.conftest import tiny_gpt2

    assert mismatch(fingerprint(tiny_llama()), tiny_gpt2()) == "model_type 'llama' there, 'gpt2' here"


def test_the_spec_is_portable():
    assert model_spec(None) == model_spec("default") == "default" and loadable_spec("default") is None
    assert model_spec("some/relative") == str(Path("some/relative").resolve())


def test_only_the_bare_base_is_fingerprinted():
    model = tiny_llama()
    identity = base_identity(model, None)
    lorafit.attach(model, lorafit.LoraConfig(init="pissa", target_modules=["q_proj"]))  # changes W in place
    with pytest.raises(lorafit.LorafitError, match="before attaching"):
        fingerprint(model)
    assert identity["model"] == "default" and identity["fingerprint"]["model_type"] == "llama"
