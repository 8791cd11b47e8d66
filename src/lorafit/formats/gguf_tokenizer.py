"""The tokenizer keys llama.cpp needs, written from a transformers folder's tokenizer.json.

llama.cpp re-implements each tokenizer: it reads the vocabulary, the token types and the BPE merges from
the file, and picks the pre-tokenizer (the regex that splits text before BPE) by the name in
`tokenizer.ggml.pre`; without one it warns that generation quality will be degraded. llama.cpp's own
converter recognises a tokenizer by hashing how it tokenizes a test text; lorafit reads the pre-tokenizer
that tokenizer.json declares and names the llama.cpp pre-tokenizer that splits text the same way, and
refuses one it does not know rather than writing a guess. Byte-level BPE tokenizers (GPT-2 style:
SmolLM, Llama 3, Qwen2, ...) are written here; SentencePiece-style ones (Llama 2, Mistral, Gemma, Phi-3) by
gguf_sentencepiece.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from lorafit.errors import LorafitError
from lorafit.formats.gguf_sentencepiece import add_sentencepiece_vocab, is_sentencepiece_style

# The GPT-2 regex's letters, numbers, other and whitespace pieces, as ByteLevel(use_regex=True) applies it.
_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True, "add_prefix_space": False}
# Llama 3's split regex, as its tokenizer.json spells it.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's (and Qwen3's): Llama 3's with every digit alone.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's pre-tokenizer for a Split(regex, Isolated) followed by ByteLevel without its own regex
_SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


def _matches(step: dict, wanted: dict) -> bool:
    return all(step.get(key) == value for key, value in wanted.items())


def llama_cpp_pre_tokenizer(pre_tokenizer: dict | None) -> str | None:
    """llama.cpp's name for the pre-tokenizer a tokenizer.json declares, or None when lorafit knows none."""
    if not pre_tokenizer:
        return None
    steps = pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    steps = steps or []
    if len(steps) == 1 and _matches(steps[0], _BYTE_LEVEL):
        return "gpt-2"
    if len(steps) == 2 and _matches(steps[0], {"type": "Digits", "individual_digits": True}) \
            and _matches(steps[1], _BYTE_LEVEL):
        return "smollm"  # every digit alone, then GPT-2's regex
    if len(steps) == 2 and _matches(steps[0], {"type": "Split", "behavior": "Isolated", "invert": False}) \
            and _matches(steps[1], {"type": "ByteLevel", "use_regex": False}):
        return _SPLITS.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


def add_tokenizer(writer: gguf.GGUFWriter, folder: Path, tokenizer, vocab_size: int) -> None:
    """tokenizer.ggml.* and the chat template for the model folder's tokenizer (byte-level or SentencePiece-style)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise LorafitError(f"{folder} has no tokenizer.json; GGUF export writes the tokenizer from it")
    spec = json.loads(path.read_text(encoding="utf-8"))
    if is_sentencepiece_style(spec):
        add_sentencepiece_vocab(writer, spec, tokenizer, vocab_size, path)
    else:
        _add_byte_level_vocab(writer, spec, tokenizer, vocab_size, path)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(_adds_bos(tokenizer))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _add_byte_level_vocab(writer: gguf.GGUFWriter, spec: dict, tokenizer, vocab_size: int, path: Path) -> None:
    """tokenizer.ggml.model "gpt2": the vocabulary, token types, merges and llama.cpp's pre-tokenizer name."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise LorafitError(f"{path}: a {model.get('type')} tokenizer (decoder {(spec.get('decoder') or {}).get('type')}); "
                           "GGUF export writes byte-level BPE and SentencePiece-style BPE (byte fallback) tokenizers: "
                           "export the adapter (--format gguf-lora) and apply it to a GGUF made by llama.cpp's converter")
    pre = llama_cpp_pre_tokenizer(spec.get("pre_tokenizer"))
    if pre is None:
        raise LorafitError(f"{path}: lorafit does not know llama.cpp's name for the pre-tokenizer "
                           f"{json.dumps(spec.get('pre_tokenizer'))[:120]} (it knows GPT-2's, SmolLM's, Llama 3's and Qwen2's); "
                           "export the adapter (--format gguf-lora) and apply it to a GGUF made by llama.cpp's converter")

    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_add_space_prefix(False)


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a text by itself (llama.cpp then does the same)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id
