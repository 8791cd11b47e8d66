"""Attention in fp32 for a bf16 base on CPU: the same attention on fp32 copies, switched on only there and
only while training, and restored after."""

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import lorafit
from lorafit import LoraConfig
from lorafit.train.attention import NAME, sdpa_fp32_on_cpu, use_fp32_attention
from lorafit.train.loop import LoopSettings, train
from tests.conftest import random_examples, tiny_llama


def test_it_is_sdpa_on_fp32_copies_handing_bf16_back():
    model = tiny_llama()
    attention = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 8, generator=generator).to(torch.bfloat16) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # grouped key/value heads, as the tiny Llama has
    ours, _ = sdpa_fp32_on_cpu(attention, q, k, v, None, dropout=0.0, scaling=8 ** -0.5)
    reference, _ = sdpa_attention_forward(attention, q.float(), k.float(), v.float(), None, dropout=0.0,
                                          scaling=8 ** -0.5)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, reference.to(torch.bfloat16))
    fp32, _ = sdpa_fp32_on_cpu(attention, q.float(), k.float(), v.float(), None, dropout=0.0, scaling=8 ** -0.5)
    assert torch.equal(fp32, reference)  # fp32 inputs: plain sdpa


def test_only_a_bf16_model_on_cpu_is_switched_and_training_restores_sdpa(tmp_path):
    assert use_fp32_attention(tiny_llama()) is None  # fp32: nothing to do
    model = tiny_llama().to(torch.bfloat16)
    lorafit.attach(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    seen = []
    settings = LoopSettings(steps=2, batch_size=4, lr=1e-3, warmup_steps=0, save_every=0)

    def record():
        seen.append(model.config._attn_implementation)
        return {}

    result = train(model, random_examples(8, lengths=(4, 12)), settings, tmp_path, pad_id=0, vocab_size=64,
                   evaluate=record, echo=lambda _: None)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert seen == [NAME]  # during training (the evaluation at the end runs inside the loop)
    assert model.config._attn_implementation == "sdpa"  # and given back afterwards
