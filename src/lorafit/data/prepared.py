"""Every record of a data source as token ids, stored compactly and cached on disk, ready to train on.

The ids of all records sit end to end in one int32 array, with one bool per token saying whether it is
trained; per record its start, what happened to it within max_length (data/encoding.py's outcomes), and
its normalised conversation as one JSON line (what exact match and --show need). Preparing streams the
source batch by batch, so memory holds one batch, not the dataset; the arrays are written to files in
lorafit's cache folder, and the per-token ones are read back a slice at a time (prepared_store.FileArray), so a
run's memory does not grow with its data.

The cache entry's name is the SHA-256 of everything the arrays depend on: the data's content, the column
mapping, the tokenizer (its full definition), the chat template, max_length and train_on_prompt, and this
format's version. It is written to a temporary folder and renamed into place when complete, and checked
(every file's size and SHA-256) before use: an entry that fails the check is prepared again, never used.
A second run, --resume and `lorafit eval` on the same data and settings reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorafit.data.encoding import CUT, CUT_TO_NOTHING, FITS, NOTHING_TRAINED, PLAIN_TEMPLATE, ConversationEncoder
from lorafit.data.prepared_store import PREPARED_FORMAT, Writer, data_cache_dir, read_entry, remove_entry
from lorafit.data.tokenizing import (
    ENCODE_BATCH,
    IGNORE_INDEX,
    OVERFLOW_CHOICES,
    DataStats,
    TokenizedExample,
    _why_none_left,
    held_out_indices,
)
from lorafit.errors import LorafitError


# -- the prepared data -----------------------------------------------------------------------------------
class PreparedData:
    """The encoded records of one data source, in source order (record i is the source's i-th record).

    `starts[i]:starts[i+1]` are record i's tokens; records with nothing to train on hold none. `notes` are
    the reader's notes about fields not used, kept so that a cached run says them too.
    """

    def __init__(self, arrays: dict[str, np.ndarray], conversations: bytes | np.ndarray, notes: list[str],
                 max_length: int, folder: Path | None = None, reused: bool = False) -> None:
        self.tokens, self.trained = arrays["tokens"], arrays["trained"]
        self.starts, self.outcomes = arrays["starts"], arrays["outcomes"]
        self.trained_counts, self.conversation_starts = arrays["trained_counts"], arrays["conversation_starts"]
        self._conversations = conversations
        self.notes, self.max_length, self.folder, self.reused = notes, max_length, folder, reused

    def __len__(self) -> int:
        return len(self.outcomes)

    def example(self, record: int) -> TokenizedExample:
        start, end = int(self.starts[record]), int(self.starts[record + 1])
        ids = self.tokens[start:end]
        labels = np.where(self.trained[start:end], ids, IGNORE_INDEX)
        return TokenizedExample(ids.tolist(), labels.tolist(), truncated=bool(self.outcomes[record] == CUT))

    def length(self, records: np.ndarray) -> np.ndarray:
        return (self.starts[records + 1] - self.starts[records]).astype(np.int64)

    def conversation(self, record: int) -> list[dict]:
        start, end = self.conversation_starts[record], self.conversation_starts[record + 1]
        return json.loads(bytes(self._conversations[int(start):int(end)]))

    def select(self, records: np.ndarray, overflow: str, purpose: str = "training",
               source: str = "") -> tuple[TokenizedSet, DataStats]:
        """The records among `records` that train under `overflow` (held-out: those that fit whole), and counts.

        Raises when none is left, saying why, as build_dataset does.
        """
        if overflow not in OVERFLOW_CHOICES:
            raise LorafitError(f"overflow must be one of {', '.join(OVERFLOW_CHOICES)}, got {overflow!r}")
        records = np.asarray(records, dtype=np.int64)
        outcome = self.outcomes[records]
        usable = (outcome == FITS) | ((outcome == CUT) & (overflow == "truncate"))
        kept = records[usable]
        stats = DataStats(examples_in=len(records), kept=len(kept))
        if overflow == "truncate":
            stats.truncated = int((outcome == CUT).sum())
            stats.dropped_all_masked = int(((outcome == NOTHING_TRAINED) | (outcome == CUT_TO_NOTHING)).sum())
            cut_to_nothing = int((outcome == CUT_TO_NOTHING).sum())
        else:
            stats.skipped_too_long = int(((outcome == CUT) | (outcome == CUT_TO_NOTHING)).sum())
            stats.dropped_all_masked = int((outcome == NOTHING_TRAINED).sum())
            cut_to_nothing = 0
        stats.total_tokens = int(self.length(kept).sum())
        stats.label_tokens = int(self.trained_counts[kept].sum())
        stats.kept_indices = np.flatnonzero(usable).tolist()
        if not len(kept):
            why = _why_none_left(stats, self.max_length, cut_to_nothing, overflow_applies=purpose == "training")
            raise LorafitError(f"{source + ': ' if source else ''}no {purpose} examples left: {why}")
        return TokenizedSet(self, kept), stats


class TokenizedSet(Sequence):
    """Some records of a PreparedData as training examples: what the loop, the planner and the loss read.

    Indexing builds one TokenizedExample (Python lists of that example's ids and labels) on demand, so
    only the examples of the current batch ever exist as Python objects.
    """

    def __init__(self, data: PreparedData, records: np.ndarray) -> None:
        self.data, self.records = data, records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.data.example(int(record)) for record in self.records[index]]
        return self.data.example(int(self.records[index]))

    @property
    def lengths(self) -> np.ndarray:
        """Every example's length in tokens, without building the examples."""
        return self.data.length(self.records)

    def first(self, count: int) -> TokenizedSet:
        return TokenizedSet(self.data, self.records[:count])

    def conversations(self) -> list[list[dict]]:
        """The examples' conversations, in the same order (what exact match compares against)."""
        return [self.data.conversation(int(record)) for record in self.records]


def example_lengths(examples) -> list[int]:
    """Lengths of a list of TokenizedExample or a TokenizedSet (read from its arrays, not one example at a time)."""
    if isinstance(examples, TokenizedSet):
        return examples.lengths.tolist()
    return [len(example.input_ids) for example in examples]


# -- preparing -------------------------------------------------------------------------------------------
@dataclass
class Preparation:
    """What one data source's preparation depends on besides its records; its digest names the cache entry."""

    data: str  # the data's content: DataSource.fingerprint(), or a digest of in-memory conversations
    max_length: int
    train_on_prompt: bool
    reading: dict = field(default_factory=dict)  # the source's format, split and column mapping

    def key(self, tokenizer) -> str:
        parts = {"format": PREPARED_FORMAT, "data": self.data, "reading": self.reading,
                 "max_length": self.max_length, "train_on_prompt": self.train_on_prompt,
                 "tokenizer": tokenizer_fingerprint(tokenizer),
                 "template": tokenizer.chat_template or PLAIN_TEMPLATE}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of everything about a tokenizer that changes ids: its full definition and special tokens."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:  # a Python tokenizer: its vocabulary
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "added": str(tokenizer.added_tokens_decoder)}
    digest.update(json.dumps(special, sort_keys=True).encode())
    return digest.hexdigest()


def prepare(tokenizer, batches: Iterable[list[tuple[str, list[dict]]]], preparation: Preparation,
            notes: Callable[[], list[str]] = list, cache: bool = True, echo=print) -> PreparedData:
    """Encode every record that `batches` yields ((place, conversation) pairs), or reuse the cached result.

    With `cache`, the arrays go to lorafit's cache folder (data_cache_dir()) and are read back from
    there as needed; without, they are kept in memory (the built-in task, tests). `notes` is called once the
    batches are exhausted: the reader's notes about fields not used.
    """
    manifest = {"max_length": preparation.max_length, "train_on_prompt": preparation.train_on_prompt,
                "reading": preparation.reading}
    if not cache:
        writer = Writer(None)
        _encode_all(tokenizer, batches, preparation, writer)
        arrays, conversations = writer.finish(manifest)
        return PreparedData(arrays, conversations, notes(), preparation.max_length)
    key = preparation.key(tokenizer)
    folder = data_cache_dir() / key
    entry = read_entry(folder, key, echo)
    reused = entry is not None
    if entry is None:
        _write_entry(tokenizer, batches, preparation, folder, {**manifest, "key": key}, notes)
        entry = read_entry(folder, key, echo, fresh=True)
        if entry is None:
            raise LorafitError(f"{folder}: the prepared data could not be read back after writing it")
    arrays, conversations, written = entry
    return PreparedData(arrays, conversations, written["notes"], written["max_length"], folder, reused)


def _write_entry(tokenizer, batches, preparation: Preparation, folder: Path, manifest: dict, notes) -> None:
    """Encode into a temporary folder beside the entry, then rename it into place: never a half entry."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name[:16]}-", dir=folder.parent))
    writer = None
    try:
        writer = Writer(temporary)
        _encode_all(tokenizer, batches, preparation, writer)
        writer.finish({**manifest, "notes": notes()})
        if folder.exists():  # damaged (found so before), or another process finished the same entry meanwhile
            if read_entry(folder, manifest["key"], lambda _line: None) is None:
                remove_entry(folder)
        if not folder.exists():
            os.replace(temporary, folder)
    finally:
        if writer is not None:
            writer.close()  # already closed when finished; after a bad record, before its folder goes
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


def prepare_source(tokenizer, source, columns, fingerprint: str, max_length: int, train_on_prompt: bool,
                   echo=print) -> PreparedData:
    """A data source (data/sources.py) read through its column mapping (data/columns.py), encoded, cached.

    `fingerprint` is source.fingerprint(), computed once by the caller, who also records it for --resume.
    """
    from lorafit.data.records import ConversationStream

    stream = ConversationStream(source, columns)
    reading = {"format": source.format, "split": source.split,
               "columns": {"fields": dict(stream.columns.fields), "tags": dict(stream.columns.tags)}}
    preparation = Preparation(fingerprint, max_length, train_on_prompt, reading)
    return prepare(tokenizer, stream.batches(ENCODE_BATCH), preparation, notes=lambda: stream.ignored, echo=echo)


def prepare_conversations(tokenizer, conversations: list[list[dict]], max_length: int, train_on_prompt: bool,
                          source: str) -> PreparedData:
    """Conversations already in memory (the built-in task), encoded in memory: nothing to cache."""
    located = [(f"{source}: example {index}", conversation) for index, conversation in enumerate(conversations)]
    batches = (located[start: start + ENCODE_BATCH] for start in range(0, len(located), ENCODE_BATCH))
    return prepare(tokenizer, batches, Preparation("", max_length, train_on_prompt), cache=False)


def _encode_all(tokenizer, batches, preparation: Preparation, writer: Writer) -> None:
    encoder = ConversationEncoder(tokenizer, preparation.max_length, preparation.train_on_prompt)
    pending: list[tuple[str, list[dict]]] = []
    for batch in batches:
        pending.extend(batch)
        while len(pending) >= ENCODE_BATCH:
            _encode_batch(encoder, pending[:ENCODE_BATCH], writer)
            pending = pending[ENCODE_BATCH:]
    if pending:
        _encode_batch(encoder, pending, writer)


def _encode_batch(encoder: ConversationEncoder, located: list[tuple[str, list[dict]]], writer: Writer) -> None:
    places = [place for place, _ in located]
    conversations = [conversation for _, conversation in located]
    writer.add(encoder.encode(conversations, places), conversations)


# -- splitting -------------------------------------------------------------------------------------------
def held_out_records(records: int, count: int, seed: int) -> np.ndarray:
    """Which of `records` records are held out (tokenizing.held_out_indices, as split_examples), in record order."""
    return np.sort(np.asarray(held_out_indices(records, count, seed), dtype=np.int64))
