"""A LoRA adapter as a GGUF adapter file, which llama.cpp applies on top of the user's own GGUF base.

What llama.cpp's loader (src/llama-adapter.cpp) reads: `general.type = "adapter"`, `general.architecture`
equal to the base model's, `adapter.type = "lora"`, `adapter.lora.alpha` (f32; absent reads as 0), and per
adapted weight `<base tensor>.lora_a` / `.lora_b`. In ggml's dimension order A is (in, r) and B (r, out),
which is peft's `lora_A.weight` (r, in) and `lora_B.weight` (out, r) as numpy holds them (gguf-py writes a
numpy shape reversed). The token embedding is the exception: llama.cpp gathers A's rows per token, so
peft's `lora_embedding_A` (r, vocab) is written transposed, (vocab, r), and `lora_embedding_B` (dim, r) as
it is.

llama.cpp scales each pair by `alpha / rank` (rank = B's r) when alpha is not 0, else by 1 (times the
user's `--lora-scaled` factor). When one alpha' gives every pair its scale s as alpha'/r (plain LoRA:
alpha' = alpha; rsLoRA with one rank: alpha' = s·r = alpha·sqrt(r)) that alpha' is written and B as it is;
otherwise (per-module rank_pattern / alpha_pattern) each pair's exact scale is folded into B and alpha = 0,
so llama.cpp computes the same s·B·A either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from lorafit.errors import LorafitError
from lorafit.formats.gguf_file import MARKER_KEY, encode, marker, read_gguf, write_gguf
from lorafit.formats.gguf_layout import Layout, layout_of, layout_of_gguf

LORA_A_SUFFIXES = {"lora_A.weight": "linear", "lora_embedding_A": "embedding"}
B_FOR_A = {"lora_A.weight": "lora_B.weight", "lora_embedding_A": "lora_embedding_B"}


@dataclass
class LoraPair:
    """One adapted weight: A and B as peft saves them, and the scale s in W + s·B·A."""

    module_path: str  # e.g. model.layers.0.self_attn.q_proj
    kind: str  # "linear" or "embedding"
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


def lora_pairs(raw: dict, config, tensors: dict[str, torch.Tensor], where: Path, prefix: str) -> list[LoraPair]:
    """The adapter's (A, B, scale) per module, or one line saying why it has no llama.cpp adapter form (the
    method says: lorafit.core.registry.Method.gguf_adapter)."""
    from lorafit.core.registry import method_for_peft_type

    method = method_for_peft_type(raw.get("peft_type"))
    what = method.gguf_adapter(config) if method.gguf_adapter else f"a {method.name} adapter"
    if what:
        raise LorafitError(f"{where}: {what} has no llama.cpp adapter form; export the merged model instead: "
                           "--format gguf")
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        body = key[len(prefix):]
        for suffix in (*B_FOR_A, *B_FOR_A.values()):
            if body.endswith("." + suffix):
                by_module.setdefault(body[: -len(suffix) - 1], {})[suffix] = tensor
                break
        else:
            raise LorafitError(f"{where}: {key} is not a LoRA A or B tensor (a trained base weight?); a GGUF adapter "
                               "holds LoRA pairs only: export the merged model instead (--format gguf)")
    pairs = []
    for path, found in sorted(by_module.items()):
        a_key = next((k for k in LORA_A_SUFFIXES if k in found), None)
        if a_key is None or B_FOR_A[a_key] not in found:
            raise LorafitError(f"{where}: {path} has only one of its LoRA A and B tensors")
        pairs.append(LoraPair(path, LORA_A_SUFFIXES[a_key], found[a_key].float(), found[B_FOR_A[a_key]].float(),
                              float(config.scaling_for(path))))
    return pairs


def common_alpha(pairs: list[LoraPair]) -> float | None:
    """The one alpha' with scale = alpha' / rank for every pair, if there is one, else None."""
    alphas = {pair.scale * pair.rank for pair in pairs}
    alpha = next(iter(alphas))
    if all(math.isclose(a, alpha, rel_tol=1e-6) for a in alphas) and alpha != 0:
        return alpha
    return None


def check_against_base(pairs: list[LoraPair], layout: Layout, base: gguf.GGUFReader, base_path: Path) -> None:
    """Refuse an adapter whose weights are not in the base GGUF, or not in these shapes: another model."""
    architecture = base.fields.get("general.architecture")
    found = architecture.contents() if architecture is not None else None
    if found != layout.architecture:
        raise LorafitError(f"{base_path} is a {found!r} model and the adapter's base is {layout.architecture!r}: "
                           "give the GGUF of the model the adapter was trained on")
    shapes = {tensor.name: tuple(int(n) for n in tensor.shape) for tensor in base.tensors}  # ggml order: (in, out)
    for pair in pairs:
        name = layout.gguf_name(pair.module_path + ".weight")
        if pair.kind == "embedding":
            wanted = (pair.lora_b.shape[0], pair.lora_a.shape[1])  # (dim, vocab)
        else:
            wanted = (pair.lora_a.shape[1], pair.lora_b.shape[0])  # (in, out)
        if name not in shapes:
            raise LorafitError(f"{base_path} has no tensor {name} for the adapter's {pair.module_path}: another model?")
        if shapes[name] != wanted:
            raise LorafitError(f"{base_path}: {name} is {shapes[name][1]}×{shapes[name][0]} (out×in) and the adapter's "
                               f"{pair.module_path} is {wanted[1]}×{wanted[0]}: the adapter is for another model")


def add_lora_tensors(writer: gguf.GGUFWriter, pairs: list[LoraPair], layout: Layout, outtype: str,
                     alpha: float | None) -> None:
    """Each pair as `<name>.lora_a` / `.lora_b` in llama.cpp's layout; B scaled by s when alpha is None."""
    for pair in pairs:
        name = layout.gguf_name(pair.module_path + ".weight")
        if name == "output.weight" and layout.tie_word_embeddings:
            raise LorafitError(f"{pair.module_path} shares its weight with the token embedding (tie_word_embeddings), "
                               "and llama.cpp's file has no separate output tensor to adapt; export the merged model "
                               "(--format gguf) or train without lm_head")
        lora_b = pair.lora_b if alpha is not None else pair.lora_b * pair.scale
        if pair.kind == "embedding":
            a, b = pair.lora_a.T.numpy(), lora_b.numpy()  # (vocab, r), (dim, r)
        else:
            a, b = pair.lora_a.numpy(), layout.to_gguf_rows(name, lora_b.numpy())  # (r, in), (out, r)
        for suffix, values in ((".lora_a", a), (".lora_b", b)):
            data, options = encode(name + suffix, np.ascontiguousarray(values), outtype)
            writer.add_tensor(name + suffix, data, **options)


def export_adapter(adapter_dir: Path, output: Path, *, base_gguf: Path | None, model_folder: Path | None,
                   outtype: str, note_other_base: str | None = None, allow_pickle: bool = False,
                   trust_remote_code: bool = False, echo=print) -> Path:
    """Write the LoRA adapter in `adapter_dir` as a GGUF adapter file for the base `base_gguf` (checked against
    it), or, for a transformers base, for the architecture `model_folder`'s config names.

    `note_other_base`: the model the adapter was trained on, when the user named another GGUF of it (said, since
    only the architecture and the adapted tensors' shapes can be compared there).
    """
    from lorafit.formats.peft import KEY_PREFIX, WEIGHTS_NAME, read_adapter
    from lorafit.models.loading import load_config

    raw, adapter_config, tensors = read_adapter(adapter_dir, allow_pickle=allow_pickle)
    pairs = lora_pairs(raw, adapter_config, tensors, adapter_dir / WEIGHTS_NAME, KEY_PREFIX)
    if base_gguf is not None:
        base = read_gguf(base_gguf)
        layout = layout_of_gguf(base, base_gguf)
        check_against_base(pairs, layout, base, base_gguf)
        if note_other_base is not None:
            echo(f"note: {adapter_dir} was trained on {note_other_base}; written for {base_gguf} (its architecture "
                 "and every adapted tensor's shape checked, its weights not compared)")
    else:
        layout = layout_of(load_config(model_folder, trust_remote_code=trust_remote_code))
    alpha = common_alpha(pairs)

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha if alpha is not None else 0.0)
        writer.add_name(f"{adapter_dir.resolve().name} (lorafit adapter)")
        writer.add_string(MARKER_KEY, marker(format="gguf-lora", adapter=str(adapter_dir.resolve())))
        add_lora_tensors(writer, pairs, layout, outtype, alpha)

    write_gguf(output, layout.architecture, fill)
    ranks = sorted({pair.rank for pair in pairs})
    scale = (f"alpha {alpha:g} (llama.cpp scales by alpha/r)" if alpha is not None
             else "each pair's scale folded into B (alpha 0: per-module ranks or alphas)")
    echo(f"wrote {output}: {len(pairs)} LoRA pairs, r={'/'.join(map(str, ranks))}, {scale}, {outtype}, "
         f"{output.stat().st_size / 2**20:.2f} MiB")
    echo(f"run it: llama-cli -m {base_gguf if base_gguf is not None else 'BASE.gguf'} --lora {output}")
    return output
