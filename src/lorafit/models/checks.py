"""Checks on the model a user named, made before transformers reads it, so that each problem is a
LorafitError naming the file: the path exists, config.json is readable and names a model type this
transformers knows, the weights are safetensors (pickle only when allowed) and none is truncated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import transformers
from safetensors import SafetensorError, safe_open
from transformers import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lorafit.errors import LorafitError, brief, first_line


def existing_model_path(spec: str | os.PathLike) -> Path:
    """`spec` as a path, refused when nothing is there (lorafit never downloads a model by name)."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise LorafitError(
            f"model path {path} does not exist (lorafit loads local files only: a model folder or a .gguf file)"
        )
    return path


def find_config_file(folder: Path) -> Path:
    """The folder's config.json; when it has none, say what it holds (a .gguf named by its folder, say)."""
    config_file = folder / "config.json"
    if not config_file.exists():
        names = sorted(p.name for p in folder.iterdir())
        hint = ""
        ggufs = [n for n in names if n.lower().endswith(".gguf")]
        if ggufs:
            hint = f"; to load a GGUF, name the file itself: {folder / ggufs[0]}"
        raise LorafitError(f"{folder} is not a model folder: no config.json (it holds {brief(names)}){hint}")
    return config_file


def read_config_json(config_file: Path) -> dict:
    """The parsed config file, which must be a JSON object with a string "model_type"."""
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


def check_model_type(data: dict, config_file: Path, trust_remote_code: bool, *, need_causal_lm: bool) -> None:
    """Refuse a model_type transformers has no classes for (or no causal LM, when one is needed), unless trusted code brings its own."""
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


def check_weights(folder: Path, allow_pickle: bool) -> bool:
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


def check_safetensors_files(folder: Path) -> None:
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
                f"{path}: not a readable safetensors file (truncated or corrupted?): {first_line(err)}"
            ) from err
