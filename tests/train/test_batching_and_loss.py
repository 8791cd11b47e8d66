"""Packed batches and the head-only loss give the same loss and gradients as the plain path."""

import os

import pytest
import torch
import torch.nn.functional as F

import lorafit
from lorafit import LoraConfig
from lorafit.data.tokenizing import IGNORE_INDEX, TokenizedExample
from lorafit.train.batching import (
    collate_packed,
    collate_padded,
    collate_pieces,
    collate_shared_prefix,
    plan_batches,
    shared_prefix_length,
)
from lorafit.train.forward import (
    forward_hidden,
    grouped_key_value_heads,
    packing_is_exact,
    prefix_sharing_is_exact,
)
from lorafit.train.loss import (
    FrozenHeadCrossEntropy,
    _softmax_cross_entropy_,
    summed_token_loss,
)
from tests.conftest import random_examples, randomize_adapters, tiny_gpt2, tiny_llama


def _examples(count=6, seed=0):
    return random_examples(count, seed, lengths=(3, 15))


def _reference_loss(model, examples):
    """Each example alone through model(...).logits: the definition of the loss."""
    total = 0.0
    for example in examples:
        logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
        targets = torch.tensor(example.labels[1:])
        total = total + F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("collate", ["packed", "padded"])
def test_loss_and_gradients_equal_the_one_by_one_reference(build, collate):
    model = build()
    lorafit.attach(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model, scale=0.1)
    examples = _examples()
    assert packing_is_exact(model, vocab_size=64)
    batch = collate_packed(examples, 0, row_tokens=30) if collate == "packed" else collate_padded(examples, 0)

    loss = summed_token_loss(model, batch)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    reference = _reference_loss(model, examples)
    reference.backward()
    assert abs(loss.item() - reference.item()) <= 1e-4 * reference.item()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(ours[name], parameter.grad, atol=1e-5, rtol=1e-4)
    assert batch.label_tokens == sum(sum(t != IGNORE_INDEX for t in e.labels[1:]) for e in examples)
    assert batch.real_tokens == sum(len(e.input_ids) for e in examples)


def test_packing_puts_examples_in_few_rows_without_padding_waste():
    examples = _examples(8)
    batch = collate_packed(examples, 0, row_tokens=1000)
    assert batch.inputs["input_ids"].shape == (1, sum(len(e.input_ids) for e in examples))
    positions = batch.inputs["position_ids"][0].tolist()
    assert positions.count(0) == 8  # every example restarts at position 0
    # no target crosses an example boundary: the last token of each example predicts nothing
    targets = batch.targets[0].tolist()
    starts = [i for i, p in enumerate(positions) if p == 0][1:]
    assert all(targets[s - 1] == IGNORE_INDEX for s in starts)


def test_chunked_head_equals_a_single_chunk():
    model = tiny_llama()
    lorafit.attach(model, LoraConfig(target_modules=["q_proj"]))
    batch = collate_packed(_examples(), 0, row_tokens=100)
    assert torch.allclose(summed_token_loss(model, batch, chunk_tokens=3), summed_token_loss(model, batch), atol=1e-4)


def test_in_place_softmax_cross_entropy_equals_torch_on_large_logits():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=generator, dtype=torch.float64) * 40 + 300  # exp would overflow unshifted
    targets = torch.randint(0, 50, (6,), generator=generator)
    reference_logits = logits.clone().requires_grad_(True)
    reference = F.cross_entropy(reference_logits, targets, reduction="sum")
    reference.backward()
    loss = _softmax_cross_entropy_(logits, targets)  # logits become the gradient
    assert torch.allclose(loss, reference, rtol=1e-12)
    assert torch.allclose(logits, reference_logits.grad, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_head_cross_entropy_with_bias_and_any_dtype_equals_autograd(dtype):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(7, 16, generator=generator).to(dtype)
    weight, bias = torch.randn(40, 16, generator=generator).to(dtype), torch.randn(40, generator=generator).to(dtype)
    targets = torch.randint(0, 40, (7,), generator=generator)
    ours_hidden = hidden.clone().requires_grad_(True)
    FrozenHeadCrossEntropy.apply(ours_hidden, weight, bias, targets, 3).backward()
    reference_hidden = hidden.clone().requires_grad_(True)
    F.cross_entropy(F.linear(reference_hidden, weight, bias).float(), targets, reduction="sum").backward()
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(ours_hidden.grad.float(), reference_hidden.grad.float(), atol=tolerance, rtol=tolerance)


def _loss_and_gradients(model, batches, **loss_options):
    model.zero_grad()
    total = 0.0
    for batch in batches:
        loss = summed_token_loss(model, batch, **loss_options)
        (loss / 7.0).backward()  # a scale, as the loop divides by the step's label tokens
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_equals_the_reference(model, examples, loss: float, gradients: dict) -> None:
    model.zero_grad()
    reference = _reference_loss(model, examples)
    (reference / 7.0).backward()
    assert abs(loss - reference.item()) <= 1e-4 * reference.item()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(gradients[name], parameter.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]], ids=["frozen-head", "adapted-head"])
def test_head_gradient_in_forward_equals_autograd_with_any_chunking(targets):
    """Frozen head: the gradient computed in the forward pass; adapted head: the checkpointed chunks."""
    model = tiny_llama()
    lorafit.attach(model, LoraConfig(r=4, target_modules=targets))
    randomize_adapters(model, scale=0.1)
    examples = _examples()
    batch = collate_packed(examples, 0, row_tokens=100)
    for chunk_tokens in (3, 1024):
        loss, ours = _loss_and_gradients(model, [batch], chunk_tokens=chunk_tokens)
        _assert_equals_the_reference(model, examples, loss, ours)


@pytest.mark.parametrize("packed", [True, False])
def test_long_examples_run_alone_and_the_pieces_add_up_to_the_reference(packed):
    model = tiny_llama()
    lorafit.attach(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model, scale=0.1)
    examples = random_examples(7, 3, lengths=(3, 40))
    long = [e for e in examples if len(e.input_ids) >= 20]
    assert 1 <= len(long) < len(examples)
    pieces = collate_pieces(examples, 0, row_tokens=20, packed=packed)

    assert len(pieces) == len(long) + 1
    for piece, example in zip(pieces, sorted(long, key=lambda e: len(e.input_ids), reverse=True)):
        assert list(piece.inputs) == ["input_ids"]  # no mask, no positions: the plain causal kernel
        assert piece.inputs["input_ids"][0].tolist() == example.input_ids
    assert sum(p.real_tokens for p in pieces) == sum(len(e.input_ids) for e in examples)
    if packed:  # the short examples share rows of at most row_tokens
        assert pieces[-1].inputs["input_ids"].shape[-1] <= 20

    loss, ours = _loss_and_gradients(model, pieces)
    _assert_equals_the_reference(model, examples, loss, ours)


def test_batch_plan_is_a_deterministic_permutation_grouped_by_length():
    lengths = [5, 50, 7, 48, 6, 49, 8, 51] * 10
    plan = plan_batches(lengths, 4, seed=3, epoch=0)
    assert plan == plan_batches(lengths, 4, seed=3, epoch=0)
    assert plan != plan_batches(lengths, 4, seed=3, epoch=1)
    assert sorted(i for batch in plan for i in batch) == list(range(len(lengths)))
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plan]
    assert sum(s <= 3 for s in spread) >= len(plan) - 2  # short and long examples are not mixed


def _examples_with_a_shared_prompt(count=5, prefix_length=20, seed=0):
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, 64, (prefix_length,), generator=generator).tolist()
    examples = []
    for _ in range(count):
        own = torch.randint(1, 64, (int(torch.randint(3, 9, (1,), generator=generator)),), generator=generator).tolist()
        reply = torch.randint(1, 64, (int(torch.randint(2, 6, (1,), generator=generator)),), generator=generator).tolist()
        ids = prompt + own + reply
        examples.append(TokenizedExample(ids, [IGNORE_INDEX] * (len(prompt) + len(own)) + reply))
    return examples


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_shared_prefix_batches_give_the_reference_loss_and_gradients(build):
    model = build()
    lorafit.attach(model, LoraConfig(r=4, target_modules="all-linear", dropout=0.0))
    randomize_adapters(model, scale=0.1)
    examples = _examples_with_a_shared_prompt()
    assert prefix_sharing_is_exact(model, vocab_size=64)
    prefix = shared_prefix_length(examples)
    assert prefix >= 20  # the prompt, plus whatever the rows' own parts happen to share
    batch = collate_shared_prefix(examples, 0, prefix)
    assert batch.inputs["prefix_ids"].shape == (1, prefix)

    loss = summed_token_loss(model, batch)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    reference = _reference_loss(model, examples)
    reference.backward()
    assert abs(loss.item() - reference.item()) <= 1e-4 * reference.item()
    assert batch.label_tokens == sum(sum(t != IGNORE_INDEX for t in e.labels[1:]) for e in examples)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(ours[name], parameter.grad, atol=1e-5, rtol=1e-4)


def test_the_shared_prefix_stops_before_the_first_labelled_prediction():
    examples = [TokenizedExample([1, 2, 3, 4, 5, 6], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4, 5, 6]),
                TokenizedExample([1, 2, 3, 4, 9], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 9])]
    assert shared_prefix_length(examples) == 2  # position 2 predicts the labelled token 4
    assert shared_prefix_length([TokenizedExample([1, 2, 3], [IGNORE_INDEX] * 3),
                                 TokenizedExample([7, 2, 3], [IGNORE_INDEX] * 3)]) == 0


def _saved_bytes(run) -> int:
    """Bytes of the tensors autograd keeps for backward while `run` executes (each storage once)."""
    storages = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        output = run()  # kept: freeing the graph early would let storages (and their addresses) be reused
    total = sum(storages.values())
    del output
    return total


def test_gradient_checkpointing_recomputes_masked_attention_with_the_shapes_it_saved():
    # Checkpointed layers run their forward again during backward, outside forward_hidden; with grouped
    # key/value heads (4 query, 2 key/value) under a mask, keeping them grouped in the first pass only
    # made the recomputed keys/values a different shape and backward failed (CheckpointError).
    from lorafit.train.setup import set_activation_checkpointing

    model = tiny_llama()
    lorafit.attach(model, LoraConfig(r=4, dropout=0.0, target_modules="all-linear"))
    randomize_adapters(model, scale=0.1)
    model.train()
    batch = collate_packed(_examples(), 0, row_tokens=30)  # packed rows: a block-diagonal mask
    plain = summed_token_loss(model, batch)
    plain.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    set_activation_checkpointing(model, True)
    checkpointed = summed_token_loss(model, batch)
    checkpointed.backward()
    set_activation_checkpointing(model, False)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert abs(checkpointed.item() - plain.item()) <= 1e-6 * plain.item()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.grad, expected[name], atol=1e-6, rtol=1e-5)


def test_masked_attention_keeps_grouped_key_value_heads_grouped_and_restores_the_environment():
    model = tiny_llama()  # 4 query heads, 2 key/value heads: repeat_kv copies each key/value head twice
    lorafit.attach(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    batch = collate_packed(random_examples(6, 1, lengths=(20, 30)), 0, row_tokens=64)  # a block-diagonal mask
    body = model.base_model
    os.environ.pop("TRANSFORMERS_SDPA_FORCE_GQA", None)
    grouped = _saved_bytes(lambda: forward_hidden(body, batch.inputs))
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
    repeated = _saved_bytes(lambda: body(**batch.inputs, use_cache=False))
    assert grouped < repeated  # the repeated copies of keys and values are not kept
    os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "0"
    try:
        with grouped_key_value_heads(torch.device("cpu")):
            assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "1"
        assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "0"
    finally:
        del os.environ["TRANSFORMERS_SDPA_FORCE_GQA"]
