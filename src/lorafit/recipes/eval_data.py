"""Which data `lorafit eval` scores: --data, else the held-out data of the run the adapter comes from.

Scoring the built-in date task for an adapter trained on the user's own data would report a number about another
task. A run folder records what it trained on (config.yaml: --data, --columns, --held-out, --seed; lorafit-run.json:
each source's path, split and SHA-256), which is enough to find its held-out examples again: its --eval-data (or a
datasets folder's validation split), or the same seeded records of --data it set aside. The data must still be the
bytes the run read (its SHA-256); otherwise other records would be scored as "held out", so eval refuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorafit.errors import LorafitError
from lorafit.recipes.run_start import read_run_settings
from lorafit.recipes.train_settings import DEFAULT_HELD_OUT_CAP
from lorafit.train import run_folder


@dataclass
class RunHeldOut:
    """A run's held-out data, opened and checked (before the model loads); `records` chosen once prepared."""

    run: Path
    source: object  # data.sources.DataSource
    columns: object  # data.columns.ColumnMap
    fingerprint: str  # the source's SHA-256, as the run recorded it
    whole: bool  # every record is held out (--eval-data, a validation split) or a seeded part of --data
    held_out: float
    seed: int

    def describe(self) -> str:
        if self.whole:
            return f"{self.source.describe()}: the held-out data of the run {self.run}"
        return f"the held-out part of {self.source.describe()}, as the run {self.run} set it aside"

    def records(self, total: int) -> tuple[np.ndarray, str]:
        """The records the run held out of `total`, and the sentence that says how many."""
        from lorafit.data.prepared import held_out_records
        from lorafit.data.tokenizing import held_out_count

        if self.whole:
            return np.arange(total), f"all {total} records"
        held_out = int(self.held_out) if self.held_out >= 1 else self.held_out
        count, why = held_out_count(held_out, total, cap=DEFAULT_HELD_OUT_CAP)
        return held_out_records(total, count, self.seed), f"{why}, seed {self.seed}"


def open_run_held_out(run: Path) -> RunHeldOut | None:
    """The run's held-out data (None when it trained on the built-in task), its bytes checked against the run's."""
    from lorafit.data.columns import ColumnMap
    from lorafit.data.sources import held_out_split, open_source

    settings = read_run_settings(run)
    if settings.get("data") is None:
        return None
    record = run_folder.read_marker(run) or {}
    columns = ColumnMap.parse(settings.get("columns"))
    entry = record.get("eval_data")
    if isinstance(entry, dict):
        source = open_source(entry["path"], "--eval-data")
        if entry.get("split"):  # a datasets folder's validation or test split
            source = held_out_split(source) or source
        whole = True
    else:
        entry = record.get("data") if isinstance(record.get("data"), dict) else {"path": settings["data"]}
        source, whole = open_source(entry["path"], "--data"), False
    fingerprint = source.fingerprint()
    if "sha256" in entry and fingerprint != entry["sha256"]:
        raise LorafitError(f"{entry['path']} has changed since the run {run} read it (its SHA-256 differs from the one "
                           f"in {run / run_folder.MARKER}): the run's held-out examples cannot be found in it again; "
                           "give --data to score the data as it is now")
    for table, schema in source.schemas():
        columns.check_schema(table, schema)
    return RunHeldOut(run, source, columns, fingerprint, whole, float(settings.get("held_out") or 0.0),
                      int(settings.get("seed", 0)))


@dataclass
class EvalData:
    """What `lorafit eval` scores, opened before the model loads: --data, a run's held-out data, or the built-in
    task's held-out split; `described` is said and recorded in --json."""

    described: str
    source: object = None  # data.sources.DataSource of --data
    columns: object = None
    run_held_out: RunHeldOut | None = None
    conversations: list | None = None  # the built-in task's

    def prepare(self, tokenizer, max_length: int, note) -> tuple[object, np.ndarray]:
        """(prepared data, the records to score) once the tokenizer is loaded."""
        from lorafit.data.prepared import prepare_conversations, prepare_source

        if self.conversations is not None:
            prepared = prepare_conversations(tokenizer, self.conversations, max_length, False, "the built-in task")
            return prepared, np.arange(len(prepared))
        held = self.run_held_out
        source, columns = (held.source, held.columns) if held is not None else (self.source, self.columns)
        prepared = prepare_source(tokenizer, source, columns, held.fingerprint if held is not None else
                                  source.fingerprint(), max_length, False, note)
        for ignored in prepared.notes:
            note(f"warning: {ignored}")
        if held is None:
            return prepared, np.arange(len(prepared))
        records, how = held.records(len(prepared))
        if not len(records):
            raise LorafitError(f"the run {held.run} held out no examples of its data (--held-out 0, no --eval-data): "
                               "give --data to score")
        note(f"held-out: {how}")
        return prepared, records


def choose_eval_data(data: str | None, columns, adapter: str | None, seed: int, seed_given: bool, note) -> EvalData:
    """--data (a datasets folder: its validation or test split); else the held-out data of the run --adapter comes
    from; else the built-in task, saying why. Checked before the model loads."""
    from lorafit.data.sources import held_out_split, open_source
    from lorafit.data.tasks import BUILTIN, date_task_splits

    if data is not None:
        source = open_source(data, "--data")
        source = held_out_split(source) or source
        for table, schema in source.schemas():
            columns.check_schema(table, schema)
        note(f"data: {source.describe()}")
        return EvalData(source.describe(), source=source, columns=columns)
    if columns:
        raise LorafitError("--columns names the columns of --data; without --data eval scores the run's own data "
                           "or the built-in task")
    run = run_folder.run_holding(Path(adapter)) if adapter is not None else None
    held = open_run_held_out(run) if run is not None else None
    if held is not None:
        note(f"data: {held.describe()} (no --data given; --data scores other data)")
        return EvalData(held.describe(), run_held_out=held)
    if run is not None and not seed_given:
        seed = int(read_run_settings(run).get("seed", 0))
    _, conversations = date_task_splits(BUILTIN.train_examples, BUILTIN.held_out_examples, seed)
    described = f"the built-in date task's {len(conversations)} held-out examples (seed {seed})"
    if run is not None:
        why = f"which the run {run} trained on"
    else:
        why = "as no --data was given" + ("" if adapter is None else f" and {adapter} is not in a lorafit run folder "
                                          "that records its data") + "; --data scores your own"
    note(f"data: {described}, {why}")
    return EvalData(described, conversations=conversations)
