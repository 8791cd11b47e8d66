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
    say_chat_template(tokenizer, adapter_dir, echo)
    return base.eval(), tokenizer, adapter_dir


def say_chat_template(tokenizer, adapter_dir, echo) -> None:
    """The `chat template:` line, and a warning when the run the adapter comes from rendered with another one (its
    lorafit-run.json records which): the same conversation would then be other tokens than it trained on."""
    from lorafit.data.encoding import chat_template_record, describe_chat_template
    from lorafit.train.run_folder import read_marker, run_holding

    now = chat_template_record(tokenizer)
    echo(f"chat template: {describe_chat_template(now)}")
    run = run_holding(adapter_dir) if adapter_dir is not None else None
    then = (read_marker(run) or {}).get("chat_template") if run is not None else None
    if isinstance(then, dict) and then.get("sha256") != now["sha256"]:
        echo(f"warning: the run {run} trained with {describe_chat_template(then)}; this tokenizer renders "
             "conversations with another template now, so answers may differ from what training measured")
