"""A base model with an adapter on top, ready to answer: the base the adapter records, loaded the way the adapter
was trained on it (its quantization and compute dtype), checked against the adapter, the adapter attached."""

from __future__ import annotations

from typing import Optional


def load_model_with_adapter(model: Optional[str], adapter: Optional[str], *, dtype: Optional[str] = None,
                            quantize: Optional[str] = None, double_quant: bool = False,
                            allow_pickle: bool = False, trust_remote_code: bool = False, echo=print):
    """(model, tokenizer, adapter folder or None) with the adapter, if any, attached; in eval mode.

    `model`: a folder, a .gguf, "default" or None (then the base the adapter records); `adapter`: an adapter
    folder, a run folder or a checkpoint. Every choice made for the caller is said through `echo`.
    """
    from lorafit.formats.adapter_base import (
        check_base_model,
        choose_base_model,
        choose_quantization,
        resolve_adapter_folder,
    )
    from lorafit.formats.peft import load_adapter
    from lorafit.models.dtypes import choose_dtype
    from lorafit.models.loading import load_model_and_tokenizer
    from lorafit.models.quantize import report_quantization

    adapter_dir = resolve_adapter_folder(adapter) if adapter is not None else None
    spec, record = choose_base_model(model, adapter_dir, echo)
    quantization = choose_quantization(quantize, double_quant, record, adapter_dir, echo)
    if dtype is None and quantization is not None and quantization.compute_dtype is not None:
        dtype = str(quantization.compute_dtype).removeprefix("torch.")  # quantized as in training
        echo(f"dtype: {dtype} (what the adapter's quantized base computed in; --dtype overrides)")
    base, tokenizer = load_model_and_tokenizer(spec, dtype=choose_dtype(dtype, echo), allow_pickle=allow_pickle,
                                               trust_remote_code=trust_remote_code, quantize=quantization)
    report_quantization(base, echo)
    if adapter_dir is not None:
        check_base_model(record, base, adapter_dir, model)
        load_adapter(base, adapter_dir, allow_pickle=allow_pickle)
    return base.eval(), tokenizer, adapter_dir
