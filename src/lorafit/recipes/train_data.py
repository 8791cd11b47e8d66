"""`lorafit train`'s data: which sources the settings name, and the training and held-out examples made of them.

Opening (before the model loads, so a wrong path, format or column fails in a second) finds every file,
checks the column mapping against the tables' columns and fingerprints the bytes; no row is read yet.
Preparing (once the tokenizer is loaded) streams the rows through the encoder into the cache, or reuses
what an earlier run prepared (data/prepared.py). The held-out examples are a seeded split of --data,
--eval-data, or a datasets folder's validation split; at most --eval-examples of them are scored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from lorafit.data.tasks import BUILTIN
from lorafit.recipes.run_start import absolute
from lorafit.recipes.train_settings import DEFAULT_HELD_OUT_CAP, TrainConfig, flag


@dataclass
class TrainingData:
    """The opened sources ("data", "eval_data") with their fingerprints, or the built-in task's conversations."""

    sources: dict = field(default_factory=dict)
    fingerprints: dict = field(default_factory=dict)
    columns: object = None  # data.columns.ColumnMap
    builtin: tuple | None = None  # (train conversations, held-out conversations)

    def record(self, name: str) -> dict | None:
        """What the run's marker says about one source: where, what form, and the SHA-256 --resume checks."""
        source = self.sources.get(name)
        if source is None:
            return None
        return {"path": absolute(source.spec), "format": source.format, "files": len(source.files),
                "split": source.split, "sha256": self.fingerprints[name]}


def open_training_data(config: TrainConfig, held_out_given: bool, echo) -> TrainingData:
    """The sources --data and --eval-data name (a datasets folder's validation split when neither --eval-data
    nor --held-out is given), checked and fingerprinted; or the built-in task."""
    from lorafit.data.columns import ColumnMap
    from lorafit.data.sources import held_out_split, open_source
    from lorafit.data.tasks import date_task_splits

    if config.data is None:
        train, held = date_task_splits(BUILTIN.train_examples, BUILTIN.held_out_examples, config.seed)
        echo(f"data: built-in date task, {len(train)} train / {len(held)} held-out examples")
        return TrainingData(builtin=(train, held))
    data = TrainingData(columns=ColumnMap.parse(config.columns))
    data.sources["data"] = open_source(config.data, "--data")
    if config.eval_data:
        data.sources["eval_data"] = open_source(config.eval_data, "--eval-data")
    elif not held_out_given and (split := held_out_split(data.sources["data"])) is not None:
        data.sources["eval_data"] = split
    for name, source in data.sources.items():
        for table, schema in source.schemas():
            data.columns.check_schema(table, schema)
        data.fingerprints[name] = source.fingerprint()
    echo(f"data: {data.sources['data'].describe()}")
    if "eval_data" in data.sources:
        echo(f"held-out data: {data.sources['eval_data'].describe()}")
    return data


def training_examples(data: TrainingData, tokenizer, config: TrainConfig, echo) -> tuple:
    """(training examples, held-out examples to score, their conversations for exact match)."""
    from lorafit.data.prepared import held_out_records, prepare_conversations
    from lorafit.data.tokenizing import held_out_count
    from lorafit.inference.evaluate import held_out_from, matchable

    if data.builtin is not None:
        name = "the built-in task"
        prepared, held = (prepare_conversations(tokenizer, chats, config.max_length, config.train_on_prompt, name)
                          for chats in data.builtin)
        train_records, held_records, held_name = np.arange(len(prepared)), np.arange(len(held)), name
    else:
        prepared = _prepared(data, "data", tokenizer, config, echo)
        if "eval_data" in data.sources:
            held = _prepared(data, "eval_data", tokenizer, config, echo)
            train_records, held_records = np.arange(len(prepared)), np.arange(len(held))
            held_name = data.sources["eval_data"].spec
        else:
            held = prepared
            fraction_or_count = int(config.held_out) if config.held_out >= 1 else config.held_out
            count, why = held_out_count(fraction_or_count, len(prepared), cap=DEFAULT_HELD_OUT_CAP)
            held_records = held_out_records(len(prepared), count, config.seed)
            train_records = np.setdiff1d(np.arange(len(prepared)), held_records, assume_unique=True)
            held_name = f"the held-out part of {config.data}"
            echo(f"held-out: {why}")
    train_set, stats = prepared.select(train_records, config.overflow, source=config.data or "the built-in task")
    echo(stats.summary())
    for warning in stats.warnings():
        echo(f"warning: {warning}")
    if not len(held_records):
        return train_set, [], []
    if not config.eval_examples:
        echo(f"held-out: {len(held_records)} examples set aside and not scored (--eval-examples 0)")
        return train_set, [], []
    scored = held_out_from(held, held_records, config.eval_examples, held_name)
    if scored.left_out:
        echo(f"warning: {scored.describe_left_out(config.max_length)}")
    to_match = matchable(tokenizer, scored.conversations, config.max_new_tokens)
    echo(f"held-out scoring: {scored.describe_scored(len(to_match), config.max_new_tokens)}")
    return train_set, scored.examples, to_match


def _prepared(data: TrainingData, name: str, tokenizer, config: TrainConfig, echo):
    """One source's prepared records: encoded now (and cached), or read back from the cache."""
    from lorafit.data.prepared import prepare_source

    started = time.perf_counter()
    prepared = prepare_source(tokenizer, data.sources[name], data.columns, data.fingerprints[name],
                              config.max_length, config.train_on_prompt, echo=echo)
    for note in prepared.notes:
        echo(f"warning: {note}")
    what = "reused the prepared" if prepared.reused else "prepared"
    echo(f"{flag(name)}: {what} {len(prepared)} records ({len(prepared.tokens)} tokens within --max-length) in "
         f"{time.perf_counter() - started:.1f} s; cache {prepared.folder}")
    return prepared
