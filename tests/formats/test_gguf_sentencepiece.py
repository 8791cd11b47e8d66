"""SentencePiece-style tokenizers (Llama 2 and Mistral put "▁" in front of the text, Gemma does not) in a merged GGUF:
llama.cpp tokenizes as transformers does, and gives lorafit's logits.

The tokenizer is trained here with the `tokenizers` library and laid out as transformers keeps Llama 2's: a BPE with
byte fallback (256 `<0xXX>` pieces after `<unk>`, `<s>`, `</s>`), spaces written "▁" by the normalizer.
"""

import json

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lorafit.cli.main import main
from tests.cli.test_train_trust import error_line
from tests.families import tiny_family_model
from tests.formats import llama_cpp_oracle as oracle
from tests.formats.conftest import lorafit_model, make_adapter
from tests.formats.test_in_llama_cpp import TEXTS as TOKENIZER_TEXTS

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Rewrite the date in ISO 8601: 17 March 2021.",
          "Numbers 1234567 and 3.14159, prices $12.50; don't won't it's I'll we've they're.",
          "a tokenizer learns pieces of words from text like this, and merges the frequent ones first"] * 20
TEXTS = [*TOKENIZER_TEXTS, "Rewrite 17 March 2021 as 2021-03-17, café 東京 🙂 twice  spaced\tand\nlines"]


def sentencepiece_style_tokenizer(prepend: bool, pieces: list[str] | None = None,
                                  merges: list[tuple[str, str]] | None = None) -> PreTrainedTokenizerFast:
    """A Llama 2-like (prepend) or Gemma-like tokenizer.json: BPE, byte fallback, spaces as "▁"; its pieces and
    merges learnt from CORPUS unless given."""
    if pieces is None:
        trainer_model = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer_model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        trainer_model.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, show_progress=False))
        trained = json.loads(trainer_model.to_str())["model"]
        pieces = [token for token, _ in sorted(trained["vocab"].items(), key=lambda item: item[1])]
        merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in trained["merges"]]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: index for index, token in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token in pieces:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    spaces = [normalizers.Replace(" ", "▁")]
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), *spaces] if prepend else spaces)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if prepend else []))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize(("model_type", "prepend"), [("llama", True), ("gemma", False)])
def test_a_sentencepiece_style_vocabulary_tokenizes_and_runs_in_llama_cpp_as_in_transformers(model_type, prepend,
                                                                                             tmp_path):
    tokenizer = sentencepiece_style_tokenizer(prepend)
    folder = tmp_path / "model"
    tiny_family_model(model_type, vocab_size=len(tokenizer)).save_pretrained(folder)  # <s> 1, </s> 2 as here
    tokenizer.save_pretrained(folder)
    adapter = make_adapter(folder, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    assert main(["export", "--adapter", str(adapter), "--format", "gguf", "--outtype", "f32",
                 "--output", str(tmp_path / "m.gguf")]) == 0
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is prepend

    llm = oracle.load(tmp_path / "m.gguf")
    model, _ = lorafit_model(folder, adapter)
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids, text
        assert ids.count(3 + 0x20) == 0  # spaces are "▁" pieces, never the byte <0x20>
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].float().numpy()
        bound = 1e-4 if model_type == "llama" else 3e-3  # Gemma's GELU: ggml's float16 table
        assert np.abs(oracle.logits(llm, ids) - expected).max() <= bound * np.abs(expected).max()
    assert any(f"<0x{b:02X}>" in tokenizer.convert_ids_to_tokens(tokenizer("東京 🙂").input_ids) for b in (0xE6, 0xF0))


def test_pieces_are_joined_in_the_order_of_their_merges_not_left_to_right(tmp_path):
    """"abc" with the merge (b, c) ranked before (a, b): BPE gives a + bc, and so must llama.cpp, which joins the
    pair whose joined piece scores highest; with equal scores it would join left to right, ab + c."""
    tokenizer = sentencepiece_style_tokenizer(False, ["a", "b", "c", "▁", "bc", "ab"], [("b", "c"), ("a", "b")])
    assert tokenizer.convert_ids_to_tokens(tokenizer("abc").input_ids) == ["<s>", "a", "bc"]
    folder = tmp_path / "model"
    tiny_family_model("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    adapter = make_adapter(folder, tmp_path / "adapter", target_modules=["q_proj"])
    assert main(["export", "--adapter", str(adapter), "--format", "gguf", "--outtype", "f32",
                 "--output", str(tmp_path / "m.gguf")]) == 0
    llm = oracle.load(tmp_path / "m.gguf")
    for text in ("abc", "abc cab bca", "ab abc"):
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text).input_ids, text


def test_a_byte_fallback_tokenizer_that_writes_spaces_otherwise_is_refused_in_one_line(tmp_path, capsys):
    tokenizer = sentencepiece_style_tokenizer(prepend=True)
    folder = tmp_path / "model"
    tiny_family_model("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    adapter = make_adapter(folder, tmp_path / "adapter", target_modules=["q_proj"])
    assert main(["export", "--adapter", str(adapter), "--format", "gguf", "--output", str(tmp_path / "m.gguf")]) == 1
    assert error_line(capsys) == (
        f"lorafit export: error: {folder / 'tokenizer.json'}: a SentencePiece-style tokenizer whose Lowercase step "
        "llama.cpp's SentencePiece tokenizer does not reproduce; export the adapter (--format gguf-lora) and apply it "
        "to a GGUF made by llama.cpp's converter")
    assert not (tmp_path / "m.gguf").exists()
