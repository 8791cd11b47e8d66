"""For every family of the matrix: lorafit's loss (label-only head, packed rows, a shared prefix) is the model's own.

The reference is `model(input_ids, labels=...)`, each example alone: transformers' own loss, with whatever the family
does after its output head (Gemma 2/3's soft-capping, Granite's and Cohere's scaling). Gradients are compared with
that same plain computation's. Tolerances (fp32): the mean loss within 1e-5, each gradient within 1e-5 of its largest
value.
"""

import pytest
import torch
from transformers import LlamaForCausalLM

import lorafit
from lorafit.data.tokenizing import IGNORE_INDEX, TokenizedExample
from lorafit.train.batching import collate_packed, collate_padded, collate_shared_prefix, shared_prefix_length
from lorafit.train.forward import packing_is_exact, prefix_sharing_is_exact
from lorafit.train.loss import summed_token_loss
from lorafit.train.output_head import LogitTransform, check_output_head, output_head
from lorafit.train.step import choose_collate
from tests.conftest import random_examples, randomize_adapters, tiny_llama
from tests.families import FAMILIES, tiny_family_model

VOCAB = 96


def _prefixed_examples() -> list[TokenizedExample]:
    """Three examples sharing an 18-token prompt (what a chat template's system prompt gives)."""
    generator = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, VOCAB, (18,), generator=generator).tolist()
    examples = []
    for length in (5, 9, 7):
        tail = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        examples.append(TokenizedExample(prefix + tail, [IGNORE_INDEX] * (len(prefix) + 2) + tail[2:]))
    return examples


def _own_loss_and_gradients(model, examples) -> tuple[float, dict]:
    """transformers' loss over the examples' label tokens (each example alone), and its gradients."""
    model.zero_grad()
    total, count = 0.0, 0
    for example in examples:
        labels = torch.tensor([example.labels])
        tokens = int((labels[0, 1:] != IGNORE_INDEX).sum())
        loss = model(input_ids=torch.tensor([example.input_ids]), labels=labels, use_cache=False).loss * tokens
        total, count = total + loss, count + tokens
    (total / count).backward()
    return float((total / count).detach()), _gradients(model)


def _gradients(model) -> dict:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return grads


def _lorafit_loss_and_gradients(model, batch) -> tuple[float, dict]:
    model.zero_grad()
    loss = summed_token_loss(model, batch) / batch.label_tokens
    loss.backward()
    return float(loss.detach()), _gradients(model)


def _assert_same(ours, reference):
    loss, grads = ours
    ref_loss, ref_grads = reference
    assert abs(loss - ref_loss) <= 1e-5
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        scale = max(float(ref_grads[name].abs().max()), 1e-6)
        assert float((grad - ref_grads[name]).abs().max()) <= 1e-5 * max(scale, 1.0), name


def _adapted(model_type: str, targets="all-linear"):
    model = tiny_family_model(model_type)
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=targets))
    randomize_adapters(model, scale=0.1)
    return model


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_every_layout_gives_the_models_own_loss_and_gradients(model_type):
    model = _adapted(model_type)
    assert check_output_head(model), f"{model_type}: body → head → transform differs from the model's logits"
    assert packing_is_exact(model, VOCAB) and prefix_sharing_is_exact(model, VOCAB)
    plain, prefixed = random_examples(4, lengths=(6, 14), vocab=VOCAB), _prefixed_examples()
    reference = _own_loss_and_gradients(model, plain)
    _assert_same(_lorafit_loss_and_gradients(model, collate_padded(plain, 0)), reference)
    _assert_same(_lorafit_loss_and_gradients(model, collate_packed(plain, 0, row_tokens=64)), reference)
    prefix = shared_prefix_length(prefixed)
    assert prefix >= 16
    _assert_same(_lorafit_loss_and_gradients(model, collate_shared_prefix(prefixed, 0, prefix)),
                 _own_loss_and_gradients(model, prefixed))


@pytest.mark.parametrize("model_type", ["gemma2", "granite", "cohere"])
def test_a_trained_output_head_goes_through_the_transform_too(model_type):
    """lm_head adapted: the head is trainable, so the loss takes autograd's path, with the family's transform."""
    model = _adapted(model_type, targets=["q_proj", "v_proj", "lm_head"])
    assert not LogitTransform.of(model.config).identity
    examples = random_examples(3, lengths=(6, 12), vocab=VOCAB)
    _assert_same(_lorafit_loss_and_gradients(model, collate_padded(examples, 0)),
                 _own_loss_and_gradients(model, examples))


def test_the_transform_and_its_derivative_match_autograd():
    transform = LogitTransform(scale=0.7, softcap=5.0)
    logits = torch.randn(4, 11, dtype=torch.float64) * 8
    reference = logits.clone().requires_grad_(True)
    out = 5.0 * torch.tanh(0.7 * reference / 5.0)
    out.sum().backward()
    in_place = logits.clone()
    derivative = transform.apply_(in_place)
    assert torch.allclose(in_place, out.detach()) and torch.allclose(transform(logits), out.detach())
    assert torch.allclose(derivative, reference.grad)
    assert LogitTransform(scale=0.5).apply_(logits.clone()) == 0.5


class _DoubledLogitsLlama(LlamaForCausalLM):
    """A family lorafit knows nothing about: it doubles its logits after the head, in its own forward."""

    def forward(self, *args, labels=None, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 2
        if labels is not None:
            output.loss = self.loss_function(output.logits, labels, self.config.vocab_size)
        return output


def test_an_unknown_logit_transform_runs_the_model_whole_and_says_so():
    model = _DoubledLogitsLlama(tiny_llama().config).eval()
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, scale=0.1)
    said = []
    collate = choose_collate(model, 64, pad_id=0, row_tokens=64, gradient_checkpointing=False, echo=said.append)
    assert output_head(model) is None and "runs _DoubledLogitsLlama whole" in said[0]
    assert "prefix" not in said[0]
    examples = random_examples(4, lengths=(6, 14), vocab=64)
    batches = collate(examples)
    assert all("prefix_ids" not in batch.inputs for batch in batches)
    ours = sum(float(summed_token_loss(model, batch).detach()) for batch in batches) / sum(b.label_tokens for b in batches)
    assert abs(ours - _own_loss_and_gradients(model, examples)[0]) <= 1e-5


def test_every_family_has_default_targets_named_like_its_attention():
    expected = {"phi3": ["qkv_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"],
                "falcon": ["query_key_value"]}
    from lorafit.core.targeting import default_targets

    for model_type in FAMILIES:
        assert default_targets(tiny_family_model(model_type)) == expected.get(model_type, ["q_proj", "v_proj"])
