"""Inference cost of adapters: merged and unmerged against the base model, and 8 adapters in one batch.

Every variant runs the same inputs, in turn, round after round (A B C, then C B A, ...), after a
warm-up round; each figure is a time ratio per round. A second copy of the base model is timed as a
control: its ratio to the base shows how far two identical models drift apart on this machine. Two shapes: prefill (a forward over 8 prompts of 128
tokens, no cache) and decode (greedy `generate`, 8 prompts of 32 tokens, 32 new tokens each).
Adapters are r=16 on all linear layers with random (non-zero) B, so the bypass does real work; peft
gets lorafit's very weights, and the outputs are checked against each other.
"""

from __future__ import annotations

import contextlib
import gc
import time

import torch
from common import SEED, Series
from sides import ALL16, copy_adapter_into_peft, load_base, peft_config

PREFILL_SHAPE = (8, 128)
DECODE_PROMPT = (8, 32)
DECODE_NEW_TOKENS = 32
ADAPTERS = [f"a{i}" for i in range(8)]


def _random_b(model, std: float = 0.02) -> None:
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def _lorafit_tensors(model, adapter: str) -> dict:
    found: dict[str, dict] = {}
    for name, parameter in model.named_parameters():
        for kind in ("lora_A", "lora_B"):
            marker = f".{kind}.{adapter}"
            if name.endswith(marker):
                found.setdefault(name[: -len(marker)], {})[kind] = parameter.detach()
    return {path: (t["lora_A"], t["lora_B"]) for path, t in found.items()}


def _lorafit_model(adapters: list[str]):
    import lorafit

    model, _ = load_base()
    for index, name in enumerate(adapters):
        torch.manual_seed(SEED + index)
        lorafit.attach(model, lorafit.LoraConfig(r=ALL16.r, alpha=ALL16.alpha, dropout=0.0,
                                                 target_modules=ALL16.targets), adapter_name=name)
    _random_b(model)
    lorafit.set_active_adapter(model, adapters[0])
    return model.eval()


def _peft_model(lorafit_model, adapters: list[str]):
    import peft

    base, _ = load_base()
    model = peft.get_peft_model(base, peft_config(ALL16), adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, peft_config(ALL16))
    for name in adapters:
        copy_adapter_into_peft(model, _lorafit_tensors(lorafit_model, name), adapter=name)
    model.set_adapter(adapters[0])
    return model.eval()


def build_variants(pad_id: int) -> tuple[dict, list[str]]:
    """{variant name: (model, context manager factory, extra kwargs)} and what is not supported yet."""
    import lorafit

    base, _ = load_base()
    control, _ = load_base()  # a second, identical base model: the noise floor of comparing two models
    merged = lorafit.merge_and_unload(_lorafit_model(["default"]))
    lorafit_one = _lorafit_model(["default"])
    lorafit_eight = _lorafit_model(ADAPTERS)
    none = contextlib.nullcontext
    variants = {
        "base": (base.eval(), none, {}),
        "base, second copy": (control.eval(), none, {}),
        "lorafit merged": (merged.eval(), none, {}),
        "lorafit unmerged": (lorafit_one, none, {}),
        "lorafit one adapter of 8": (lorafit_eight, none, {}),
    }
    missing = []
    if hasattr(lorafit, "adapter_per_row"):
        variants["lorafit 8 adapters, one per row"] = (
            lorafit_eight, lambda: lorafit.adapter_per_row(lorafit_eight, ADAPTERS), {})
    else:
        missing.append("lorafit 8 adapters, one per row")
    peft_one = _peft_model(lorafit_one, ["default"])
    peft_eight = _peft_model(lorafit_eight, ADAPTERS)
    variants["peft unmerged"] = (peft_one, none, {})
    variants["peft one adapter of 8"] = (peft_eight, none, {})
    variants["peft 8 adapters, one per row"] = (peft_eight, none, {"adapter_names": ADAPTERS})
    return variants, missing


def _inputs(examples: list, rows: int, length: int) -> torch.Tensor:
    """`rows` real token sequences of exactly `length` tokens (the first long-enough examples, cut)."""
    chosen = [e.input_ids[:length] for e in examples if len(e.input_ids) >= length][:rows]
    if len(chosen) < rows:
        raise RuntimeError(f"need {rows} examples of >= {length} tokens")
    return torch.tensor(chosen)


@torch.no_grad()
def _prefill(model, context, kwargs, ids):
    with context():
        return model(input_ids=ids, use_cache=False, **kwargs).logits


@torch.no_grad()
def _decode(model, context, kwargs, ids, pad_id):
    with context():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=DECODE_NEW_TOKENS,
                              min_new_tokens=DECODE_NEW_TOKENS, do_sample=False, pad_token_id=pad_id, **kwargs)


def compare_inference(examples: list, pad_id: int, rounds: int, sgemm: Series, sgemm_sample, log=print) -> dict:
    """Time every variant, prefill and decode, for 1 warm-up round + `rounds` measured ones."""
    variants, missing = build_variants(pad_id)
    prefill_ids = _inputs(examples, *PREFILL_SHAPE)
    decode_ids = _inputs(examples, *DECODE_PROMPT)
    times = {shape: {name: [] for name in variants} for shape in ("prefill", "decode")}
    outputs = {}
    names = list(variants)
    for round_index in range(rounds + 1):
        # Forward order, then reversed (A B C, C B A, ...): a position in the round favours no variant.
        for name in names if round_index % 2 == 0 else names[::-1]:
            model, context, kwargs = variants[name]
            started = time.perf_counter()
            logits = _prefill(model, context, kwargs, prefill_ids)
            middle = time.perf_counter()
            generated = _decode(model, context, kwargs, decode_ids, pad_id)
            ended = time.perf_counter()
            if round_index == 0:
                outputs[name] = (logits, generated)
            else:
                times["prefill"][name].append(middle - started)
                times["decode"][name].append(ended - middle)
        sgemm.add(sgemm_sample())
        log(f"  inference round {round_index + 1}/{rounds + 1}{' (warm-up)' if round_index == 0 else ''}: "
            + ", ".join(f"{n} {times['prefill'][n][-1]:.2f}+{times['decode'][n][-1]:.2f} s"
                        for n in variants if round_index > 0))
    checks = _agreement(outputs)
    del variants
    gc.collect()
    return {"times": times, "missing": missing, "checks": checks,
            "prefill_tokens": prefill_ids.numel(), "decode_tokens": DECODE_PROMPT[0] * DECODE_NEW_TOKENS}


def _agreement(outputs: dict) -> dict:
    """Max |Δ logits| between variants that must compute the same thing (fp32: ~1e-4 or less)."""
    def gap(a, b):
        if a not in outputs or b not in outputs:
            return None
        return float((outputs[a][0] - outputs[b][0]).abs().max())

    return {"lorafit merged vs unmerged": gap("lorafit merged", "lorafit unmerged"),
            "lorafit vs peft, unmerged": gap("lorafit unmerged", "peft unmerged"),
            "lorafit vs peft, 8 adapters one per row": gap("lorafit 8 adapters, one per row",
                                                          "peft 8 adapters, one per row")}


def ratio_series(times: dict, numerator: str, denominator: str) -> Series:
    """Per-round times[numerator] / times[denominator] (paired within a round)."""
    series = Series()
    if numerator in times and denominator in times:
        for a, b in zip(times[numerator], times[denominator]):
            series.add(a / b)
    return series
