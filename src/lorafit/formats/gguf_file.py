"""Writing one GGUF file: tensor encodings for --outtype, atomic writes, and what --overwrite may replace.

Every file lorafit exports carries the key `lorafit.export` (llama.cpp ignores keys it does not know);
`--overwrite` replaces only a file that has it, so a GGUF that lorafit did not write -- the user's base
model, say -- is never replaced. The file is written beside its target and renamed over it when complete.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from lorafit.errors import LorafitError
from lorafit.files import atomic_path
from lorafit.version import __version__

MARKER_KEY = "lorafit.export"

# --outtype -> ggml's type, and the file type llama.cpp reports for a file mostly of it
GGML_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
F16_MAX = float(np.finfo(np.float16).max)


def encode(name: str, values: np.ndarray, outtype: str) -> tuple[np.ndarray, dict]:
    """(data, GGUFWriter.add_tensor keywords) for a float array written as `outtype`.

    1-D tensors (norms, biases) stay f32, as llama.cpp's converter keeps them; q8_0 packs rows in blocks
    of 32 values, and a tensor whose rows are not a multiple of 32 is written f16. A value beyond f16's
    range is refused rather than written as an infinity.
    """
    values = np.ascontiguousarray(values, dtype=np.float32)
    if values.ndim == 1 or outtype == "f32":
        return values, {}
    qtype = GGML_TYPES[outtype]
    if qtype == gguf.GGMLQuantizationType.Q8_0 and values.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = gguf.GGMLQuantizationType.F16
    if qtype == gguf.GGMLQuantizationType.F16:
        largest = float(np.abs(values).max(initial=0.0))
        if largest > F16_MAX:
            raise LorafitError(f"{name}: a value of {largest:.3g} is beyond float16's range; use --outtype bf16 or f32")
        return values.astype(np.float16), {}
    return gguf.quants.quantize(values, qtype), {"raw_dtype": qtype}


def check_output(output: Path, overwrite: bool, inputs: dict[str, Path | None]) -> None:
    """Refuse an output that is one of the input files, that exists without --overwrite, or that lorafit did
    not write; changes nothing."""
    for what, path in inputs.items():
        if path is not None and output.exists() and Path(path).exists() and output.samefile(path):
            raise LorafitError(f"--output {output} is {what}; choose another --output")
    if output.is_dir():
        raise LorafitError(f"--output {output} is a folder; give a file name ending in .gguf")
    if output.suffix.lower() != ".gguf":
        raise LorafitError(f"--output {output}: give a file name ending in .gguf")
    if not output.exists():
        if output.parent.exists() and not output.parent.is_dir():
            raise LorafitError(f"--output {output}: {output.parent} is a file")
        return
    if not overwrite:
        raise LorafitError(f"--output {output} exists; pass --overwrite to replace an earlier lorafit export")
    if not written_by_lorafit(output):
        raise LorafitError(f"--overwrite: {output} was not written by `lorafit export` (no {MARKER_KEY} key); lorafit "
                           "replaces only files it wrote: choose another --output")


def written_by_lorafit(path: Path) -> bool:
    try:
        return MARKER_KEY in gguf.GGUFReader(path).fields
    except Exception:  # not a GGUF file at all: numpy, struct and value errors, whatever gguf-py raises
        return False


def marker(**facts) -> str:
    return json.dumps({"lorafit": __version__, **facts}, sort_keys=True)


def write_gguf(output: Path, architecture: str, fill: Callable[[gguf.GGUFWriter], None]) -> None:
    """Write a GGUF file atomically: `fill(writer)` adds the keys and tensors; nothing is left on failure."""
    with atomic_path(output) as temporary:
        writer = gguf.GGUFWriter(temporary, architecture)
        try:
            fill(writer)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()


def read_gguf(path: Path) -> gguf.GGUFReader:
    """A GGUF file opened for reading, or one line saying it is not one."""
    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # numpy, struct and value errors: gguf-py has no error type of its own
        raise LorafitError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None
