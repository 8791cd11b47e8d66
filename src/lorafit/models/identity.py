"""Which base model an adapter or a run was made for, recorded so it is never silently swapped.

An identity is the model as the user named it (a folder or .gguf path made absolute, or "default" for
the embedded model: portable, unlike the per-environment cache folder a GGUF is converted into) plus a
fingerprint of the loaded base: its model_type, every parameter's shape and a few values of the input
embedding and of the last weight matrix. Values are compared with a tolerance that admits the same
weights loaded in another dtype (bf16 keeps ~3 significant digits) and refuses other weights. lorafit
writes it into the adapter's safetensors metadata (`lorafit_base_model`), where peft and vLLM do not look.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from lorafit.errors import LorafitError

DEFAULT_MODEL = "default"  # how --model names the embedded SmolLM2 explicitly
METADATA_KEY = "lorafit_base_model"
_SAMPLES = 16
_RELATIVE_TOLERANCE = 2e-2
_ABSOLUTE_TOLERANCE = 1e-4


def model_spec(spec: str | None) -> str:
    """The portable name of what --model named: "default", or the path made absolute."""
    if spec is None or spec == DEFAULT_MODEL:
        return DEFAULT_MODEL
    return str(Path(spec).expanduser().resolve())


def loadable_spec(spec: str) -> str | None:
    """What models.loading.load_model_and_tokenizer takes for a recorded spec (None: the embedded model)."""
    return None if spec == DEFAULT_MODEL else spec


def _samples(tensor: torch.Tensor) -> list[float]:
    flat = tensor.detach().reshape(-1)
    last = flat.numel() - 1  # integer spacing: a float linspace over 28 M elements rounds past the end
    positions = torch.tensor([i * last // (_SAMPLES - 1) for i in range(_SAMPLES)], device=flat.device)
    return [float(v) for v in flat[positions].float().cpu()]


def fingerprint(model: nn.Module) -> dict:
    """The bare base model's fingerprint (call it before any adapter is attached).

    A bitsandbytes-quantized layer counts with its logical (out, in) shape and its dequantized values,
    and is listed under "quantized": the same base loaded in float and in 4 bits then has the same
    shapes and embeddings, and only the samples of a matrix quantized on one side are not compared.
    """
    from lorafit.core.base_layer import linear_base
    from lorafit.models.quantize import quantized_layers

    if hasattr(model, "lorafit_state"):
        raise LorafitError("fingerprint the base model before attaching adapters to it")
    dense = {f"{path}.weight": linear_base(layer) for path, layer in quantized_layers(model)}
    shapes = {name: ([dense[name].out_features, dense[name].in_features] if name in dense else list(p.shape))
              for name, p in model.named_parameters()}
    embedding = model.get_input_embeddings().weight
    last_name = [name for name, shape in shapes.items() if len(shape) == 2][-1]
    last = dense[last_name].dense_weight() if last_name in dense else model.get_parameter(last_name)
    record = {
        "model_type": getattr(getattr(model, "config", None), "model_type", type(model).__name__),
        "shapes": shapes,
        "samples": {"input_embeddings": _samples(embedding), last_name: _samples(last)},
    }
    if dense:
        record["quantized"] = sorted(dense)
    return record


def base_identity(model: nn.Module, spec: str | None) -> dict:
    """The record an adapter carries: the model as named, its fingerprint, and its bitsandbytes quantization
    if any (so eval/generate/merge load the base as it was trained on)."""
    from lorafit.models.quantize import quantization_of

    record = {"model": model_spec(spec), "fingerprint": fingerprint(model)}
    quantization = quantization_of(model)
    if quantization is not None:
        record["quantize"] = quantization.to_record()
    return record


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _RELATIVE_TOLERANCE * max(abs(a), abs(b)) + _ABSOLUTE_TOLERANCE


def mismatch(recorded: dict, model: nn.Module) -> str | None:
    """How `model` differs from a recorded fingerprint, in a few words; None when it is the same base."""
    now = fingerprint(model)
    if recorded.get("model_type") != now["model_type"]:
        return f"model_type {recorded.get('model_type')!r} there, {now['model_type']!r} here"
    there, here = recorded.get("shapes") or {}, now["shapes"]
    if there != here:
        for name in sorted(set(there) & set(here)):  # a weight both have, in another shape, says most
            if there[name] != here[name]:
                return f"weight shapes differ ({name}: {there[name]} there, {here[name]} here)"
        only_there, only_here = sorted(set(there) - set(here)), sorted(set(here) - set(there))
        return (f"other weights ({only_there[0]} only there)" if only_there else f"other weights ({only_here[0]} only here)")
    quantized_there, quantized_here = set(recorded.get("quantized") or []), set(now.get("quantized", []))
    for name, values in (recorded.get("samples") or {}).items():
        if (name in quantized_there) != (name in quantized_here):
            continue  # float on one side, 4/8-bit on the other: the values differ by design
        mine = now["samples"].get(name)
        if mine is None or len(mine) != len(values) or not all(_close(a, b) for a, b in zip(values, mine)):
            return f"same shapes but other weights ({name} differs)"
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
