"""Base model + tokenizer loading: a Hugging Face folder, a .gguf file, or the embedded default model.

A .gguf file (the default is one) is first converted into a cached folder by lorafit.models.gguf_cache; every
load then reads a folder, checked by lorafit.models.checks. Everything is read from local files:
nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lorafit.errors import LorafitError, first_line
from lorafit.models.checks import (
    check_model_type,
    check_safetensors_files,
    check_weights,
    existing_model_path,
    find_config_file,
    read_config_json,
)
from lorafit.models.dtypes import parse_dtype
from lorafit.models.gguf_cache import cached_conversion, default_model_path
from lorafit.models.quantize import (
    QuantizeSettings,
    bitsandbytes_config,
    import_bitsandbytes,
    keep_weights_as_trained,
)
from lorafit.models.quantized_load import file_dtype, load_tensor_by_tensor

log = logging.getLogger(__name__)

# Any one of these means the folder has a tokenizer AutoTokenizer can build.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
    "sentencepiece.bpe.model", "tokenizer.tiktoken",
)


def resolve_model_folder(spec: str | os.PathLike | None = None) -> Path:
    """The Hugging Face model folder that `spec` names, converting a .gguf file into the cache if needed.

    `spec` is None (the embedded default), a .gguf file, or a folder with config.json.
    """
    path = default_model_path() if spec is None else existing_model_path(spec)
    if path.is_dir():
        return path
    if path.suffix.lower() == ".gguf":
        return cached_conversion(path)
    if path.name.endswith(".json"):
        raise LorafitError(f"{path} is a file: name the model folder that holds it, {path.parent}")
    raise LorafitError(f"{path} is neither a model folder nor a .gguf file")


def load_model_and_tokenizer(
    spec: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    quantize: QuantizeSettings | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from local files.

    spec: None for the embedded default (SmolLM2-135M-Instruct), a .gguf file, or a model folder
        (config.json, *.safetensors, tokenizer files).
    dtype: torch dtype or its name ("float32", "bfloat16", "float16"); default float32, whatever the device.
    device: where the model goes; default "cuda" when available, else "cpu".
    allow_pickle: also accept pytorch_model.bin weights, which run code when unpickled. Off by default.
    trust_remote_code: run modeling code shipped inside the folder (auto_map in config.json).
    quantize: store the linear layers (not the head) in 4 or 8 bits with bitsandbytes, quantized tensor
        by tensor as they load (the float model is never whole in memory); compute in `dtype`. A folder
        bitsandbytes already quantized (config.json's quantization_config) loads as it is, without this.

    The weights' folder is `model.name_or_path` (the cache folder for a .gguf). A tokenizer without a pad
    token gets pad = eos: batches need some id in padded positions, the attention mask and the -100 labels
    keep it out of both attention and loss, and reusing eos adds no token (which would resize the model).
    """
    torch_dtype = parse_dtype(dtype)
    torch_device = _parse_device(device)
    folder = resolve_model_folder(spec)
    config_data = read_config_json(find_config_file(folder))
    check_model_type(config_data, folder / "config.json", trust_remote_code, need_causal_lm=True)
    use_safetensors = check_weights(folder, allow_pickle)
    if use_safetensors:
        check_safetensors_files(folder)
    tokenizer = _load_tokenizer(folder, trust_remote_code)
    quantization = _quantization_arguments(folder, config_data, quantize, torch_dtype, torch_device)
    with _one_line_load_errors(folder):
        if use_safetensors and _converts(folder, quantization, torch_dtype):
            # one tensor at a time (lorafit.models.quantized_load), or None: then transformers' loader
            model = load_tensor_by_tensor(folder, load_config(folder, trust_remote_code=trust_remote_code),
                                          quantize if quantization else None, torch_dtype, torch_device,
                                          trust_remote_code)
            if model is not None:
                return _contiguous_head_input(model), tokenizer
        model = _from_pretrained(folder, torch_dtype, use_safetensors, trust_remote_code, quantization)
    if quantization:  # placed by device_map already (transformers refuses .to() on a quantized model)
        keep_weights_as_trained(model)
        return _contiguous_head_input(model), tokenizer
    return _contiguous_head_input(model.to(torch_device)), tokenizer


@contextmanager
def _one_line_load_errors(folder: Path) -> Iterator[None]:
    """What transformers raises while loading the weights, as one line naming the folder."""
    try:
        yield
    except SafetensorError as err:  # what check_safetensors_files cannot see, e.g. a file changed since
        raise LorafitError(
            f"{folder}: a *.safetensors file is not readable (truncated or corrupted?): {first_line(err)}"
        ) from err
    except (OSError, ValueError) as err:
        raise LorafitError(f"{folder}: transformers could not load the model: {first_line(err)}") from err
    except RuntimeError as err:
        if "mismatched" not in str(err):
            raise
        raise LorafitError(
            f"{folder}: weight shapes do not match config.json (see the load report above)"
        ) from err


def _from_pretrained(folder: Path, dtype: torch.dtype, use_safetensors: bool, trust_remote_code: bool,
                     quantization: dict) -> PreTrainedModel:
    """transformers' loader, refusing a checkpoint that lacks weights config.json calls for."""
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, trust_remote_code=trust_remote_code, use_safetensors=use_safetensors,
        dtype=dtype, output_loading_info=True, **quantization)
    # transformers fills missing weights with random values and only warns; a half-random base model
    # trains without complaint, so refuse it.
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise LorafitError(
            f"{folder}: the checkpoint lacks {len(missing)} weights that config.json calls for "
            f"(e.g. {', '.join(missing[:3])})"
        )
    if info["unexpected_keys"]:
        log.warning("%s: %d checkpoint weights were not used, e.g. %s", folder,
                    len(info["unexpected_keys"]), sorted(info["unexpected_keys"])[:3])
    return model


def _contiguous_head_input(model: PreTrainedModel) -> PreTrainedModel:
    """Hand the output head a contiguous input on CPU (a forward pre-hook on the head module).

    transformers runs the head on `hidden[:, -1:, :]` when generating, a strided view; for it PyTorch
    2.13's CPU `linear` with a frozen weight copies the weight once per row of the batch and runs a
    batched matmul: measured on the embedded model (vocabulary 49,152), batch 16, 3.75 s and +900 MiB in
    bf16, 0.18 s in fp32, against 0.02 s for the same product on a contiguous copy of the (16, 1, 576)
    input. Every held-out exact-match pass starts each batch that way.
    """
    head = model.get_output_embeddings()
    if head is not None and next(model.parameters()).device.type == "cpu":
        head.register_forward_pre_hook(_make_contiguous)
    return model


def _make_contiguous(module, args):
    return (args[0].contiguous(), *args[1:]) if args and isinstance(args[0], torch.Tensor) else None


def _converts(folder: Path, quantization: dict, dtype: torch.dtype) -> bool:
    """Does loading change the file tensors (quantize them, or cast them to another dtype)?"""
    if quantization:
        return "quantization_config" in quantization  # not a folder bitsandbytes already quantized
    return file_dtype(folder) not in (None, dtype)


def prequantized_settings(folder: Path, config_data: dict) -> QuantizeSettings | None:
    """The bitsandbytes quantization a folder's config.json declares (None: a float folder)."""
    declared = config_data.get("quantization_config")
    if not declared:
        return None
    where = f"{folder / 'config.json'}: quantization_config"
    method = declared.get("quant_method") if isinstance(declared, dict) else None
    if method != "bitsandbytes":
        raise LorafitError(f"{where}.quant_method is {method!r}, which lorafit does not read (it reads bitsandbytes "
                           "4-bit and 8-bit folders); give the float model and --quantize nf4|fp4|int8")
    if declared.get("load_in_8bit"):
        return QuantizeSettings("int8")
    if declared.get("load_in_4bit"):
        kind = declared.get("bnb_4bit_quant_type", "fp4")
        if kind not in ("nf4", "fp4"):
            raise LorafitError(f"{where}.bnb_4bit_quant_type is {kind!r}; lorafit reads nf4 and fp4")
        return QuantizeSettings(kind, bool(declared.get("bnb_4bit_use_double_quant", False)))
    raise LorafitError(f"{where} sets neither load_in_4bit nor load_in_8bit")


def _float_modules(folder: Path, quantize: QuantizeSettings, device: torch.device) -> list[str]:
    """What transformers must leave in float: the output head, and what quantize_model would leave
    (lorafit.models.quantize.kept_float_on_cpu), found on a meta-device copy of the model."""
    from lorafit.models.quantize import layers_to_quantize

    skeleton = build_on_meta(load_config(folder))
    _, kept = layers_to_quantize(skeleton, quantize, device)
    head = skeleton.get_output_embeddings()
    heads = [path for path, module in skeleton.named_modules() if module is head]
    return [re.escape(path) for path in heads + kept]  # transformers reads them as patterns


def _quantization_arguments(folder: Path, config_data: dict, quantize: QuantizeSettings | None,
                            dtype: torch.dtype, device: torch.device) -> dict:
    """Extra from_pretrained arguments for a quantized load ({} for a float one)."""
    already = prequantized_settings(folder, config_data)
    if already is None and quantize is None:
        return {}
    import_bitsandbytes()  # the one clear line when it is missing
    if already is not None:
        if quantize is not None and not quantize.same_format(already):
            raise LorafitError(f"{folder} is already quantized ({already.describe()}); it cannot be loaded as "
                               f"{quantize.describe()}: drop --quantize, or give the float model")
        return {"device_map": {"": str(device)}}
    settings = bitsandbytes_config(quantize, dtype, _float_modules(folder, quantize, device))
    return {"quantization_config": settings, "device_map": {"": str(device)}}


def load_config(path: str | os.PathLike, *, trust_remote_code: bool = False) -> PretrainedConfig:
    """The transformers config in a config.json file (any name ending in .json) or a model folder."""
    path = existing_model_path(path)
    config_file = find_config_file(path) if path.is_dir() else path
    data = read_config_json(config_file)
    check_model_type(data, config_file, trust_remote_code, need_causal_lm=False)
    try:
        return AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, TypeError) as err:
        raise LorafitError(f"{config_file}: not a valid {data['model_type']} config: {first_line(err)}") from err


def build_on_meta(config: PretrainedConfig, *, trust_remote_code: bool = False) -> PreTrainedModel:
    """The causal LM that `config` describes, on the meta device: shapes only, no memory.

    For counting parameters (or planning memory) of models too big to build for real.
    """
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise LorafitError(f"model_type {config.model_type!r} has no causal-LM class in transformers")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _load_tokenizer(folder: Path, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    if not any((folder / name).exists() for name in _TOKENIZER_FILES):
        raise LorafitError(f"{folder} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, TypeError) as err:
        raise LorafitError(f"{folder}: could not load its tokenizer: {first_line(err)}") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LorafitError(
                f"{folder}: the tokenizer has neither a pad nor an eos token; set one in tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _parse_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise LorafitError(f"unknown device {device!r}: use e.g. cpu, cuda, cuda:1") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LorafitError(f"device {device} was asked for, but this torch build sees no CUDA GPU")
    return device
