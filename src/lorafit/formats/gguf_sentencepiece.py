"""SentencePiece-style vocabularies (Llama 2, Mistral 7B v0.1, Gemma, Phi-3) for llama.cpp's `llama` tokenizer model.

transformers keeps such a tokenizer as tokenizer.json: a BPE model with byte fallback (the `<0x00>`..`<0xFF>`
pieces stand for bytes no other piece covers), spaces written as "▁" by its normalizer or a Metaspace
pre-tokenizer, which Llama 2 and Mistral also put in front of the text. llama.cpp's SentencePiece tokenizer
reads three lists -- the pieces, a score and a type per piece -- and at each step joins the adjacent pair whose
joined piece scores highest, as SentencePiece itself does. A SentencePiece BPE model scores the piece its k-th
merge made -k; tokenizer.json keeps those merges in that order, so the score written is minus the rank of the
merge that makes a piece, and a piece no merge makes (a character, a byte, a special token) scores below all.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf

from lorafit.errors import LorafitError

SPACE = "▁"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def is_sentencepiece_style(spec: dict) -> bool:
    model = spec.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def adds_space_prefix(spec: dict, path: Path) -> bool:
    """Does the tokenizer put "▁" in front of the text (Llama 2, Mistral) or not (Gemma)? Refuses another way of
    writing spaces, which llama.cpp's SentencePiece tokenizer would not reproduce."""
    steps = _steps(spec.get("normalizer")) + _steps(spec.get("pre_tokenizer"))
    prepends, replaces = False, False
    for step in steps:
        kind = step.get("type")
        if kind == "Prepend" and step.get("prepend") == SPACE:
            prepends = True
        elif kind == "Replace" and (step.get("pattern") or {}).get("String") == " " and step.get("content") == SPACE:
            replaces = True
        elif kind == "Metaspace" and step.get("replacement") == SPACE and not step.get("split", False):
            replaces = True
            prepends = prepends or step.get("prepend_scheme", "always") in ("always", "first")
        else:
            raise LorafitError(f"{path}: a SentencePiece-style tokenizer whose {kind} step llama.cpp's SentencePiece "
                               "tokenizer does not reproduce; export the adapter (--format gguf-lora) and apply it to "
                               "a GGUF made by llama.cpp's converter")
    if not replaces:
        raise LorafitError(f"{path}: a BPE tokenizer with byte fallback that does not write spaces as '{SPACE}'; "
                           "export the adapter (--format gguf-lora) and apply it to a GGUF made by llama.cpp's converter")
    return prepends


def _steps(part: dict | None) -> list[dict]:
    if not part:
        return []
    if part.get("type") == "Sequence":
        return list(part.get("normalizers") or part.get("pretokenizers") or [])
    return [part]


def add_sentencepiece_vocab(writer: gguf.GGUFWriter, spec: dict, tokenizer, vocab_size: int, path: Path) -> None:
    """tokenizer.ggml.model "llama": pieces, scores (minus each piece's merge rank) and types (byte, control,
    user-defined, unknown, normal), and whether a space is put in front of the text."""
    add_space_prefix = adds_space_prefix(spec, path)
    model = spec["model"]
    merges = [merge.split(" ", 1) if isinstance(merge, str) else merge for merge in model.get("merges", [])]
    made_by = {left + right: rank for rank, (left, right) in reversed(list(enumerate(merges)))}
    unmade = -float(len(merges) + 1)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, scores, types = [], [], []
    for index in range(vocab_size):
        piece = by_id.get(index)
        if piece is None:
            tokens.append(f"[PAD{index}]")
            scores.append(unmade)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(piece)
        scores.append(-float(made_by[piece]) if piece in made_by else unmade)
        if index == tokenizer.unk_token_id:
            types.append(gguf.TokenType.UNKNOWN)
        elif index in added:
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        elif _BYTE_PIECE.fullmatch(piece):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(add_space_prefix)
