"""Rows of Parquet, CSV/TSV and Arrow IPC files and of datasets save_to_disk folders, a batch at a time.

Each row comes out as a dict with its place, 'file[index]' (0-based within the file; 'file[row i]' for
CSV, whose quoted cells may span lines, so a row is not a line). Null values are left out of the dict:
a table gives every row every column, so null is how it says a field is absent (alpaca without 'input').
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.ipc as pa_ipc
import pyarrow.parquet as pq

from lorafit.data.json_records import GZIP_MAGIC, open_bytes
from lorafit.errors import LorafitError, first_line

ARROW_FILE_MAGIC = b"ARROW1"  # the IPC file format; datasets writes the IPC stream format in its .arrow files
DELIMITERS = {"csv": ",", "tsv": "\t"}


def table_records(path: Path, format: str, batch_size: int) -> Iterator[tuple[str, object]]:
    """The file's rows with their places, read batch_size rows at a time."""
    index = 0
    for batch in _batches(path, format, batch_size):
        for row in batch.to_pylist():
            yield _place(path, format, index), without_nulls(row)
            index += 1


def table_schema(path: Path, format: str) -> pa.Schema:
    """The file's column names and types, read without its rows (CSV: every column is text)."""
    with _explained(path, format):
        if format == "parquet":
            return pq.ParquetFile(path).schema_arrow
        if format == "arrow":
            with pa.memory_map(str(path)) as source:
                return _ipc_reader(source).schema
        return pa.schema([(name, pa.string()) for name in _csv_header(path, format)])


def _place(path: Path, format: str, index: int) -> str:
    return f"{path}[row {index}]" if format in DELIMITERS else f"{path}[{index}]"


def without_nulls(value: object) -> object:
    """The value with every null-valued key left out of its dicts, at any depth (nulls inside lists stay)."""
    if isinstance(value, dict):
        return {key: without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [without_nulls(item) for item in value]
    return value


def _batches(path: Path, format: str, batch_size: int) -> Iterator[pa.RecordBatch]:
    with _explained(path, format):
        if format == "parquet":
            yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size)
        elif format == "arrow":
            with pa.memory_map(str(path)) as source:  # mapped, so a large batch costs no memory until sliced
                for batch in _ipc_batches(_ipc_reader(source)):
                    yield from _slices(batch, batch_size)
        else:
            yield from _csv_batches(path, format)


def _ipc_reader(source: pa.MemoryMappedFile) -> pa_ipc.RecordBatchFileReader | pa_ipc.RecordBatchStreamReader:
    is_file_format = source.read(len(ARROW_FILE_MAGIC)) == ARROW_FILE_MAGIC
    source.seek(0)
    return pa_ipc.open_file(source) if is_file_format else pa_ipc.open_stream(source)


def _ipc_batches(reader) -> Iterator[pa.RecordBatch]:
    if isinstance(reader, pa_ipc.RecordBatchFileReader):
        return (reader.get_batch(index) for index in range(reader.num_record_batches))
    return iter(reader)


def _slices(batch: pa.RecordBatch, size: int) -> Iterator[pa.RecordBatch]:
    for offset in range(0, batch.num_rows, size):
        yield batch.slice(offset, size)


def _csv_input(path: Path) -> pa.NativeFile:
    with open(path, "rb") as handle:
        compressed = handle.read(2) == GZIP_MAGIC
    return pa.input_stream(str(path), compression="gzip" if compressed else None)


def _csv_header(path: Path, format: str) -> list[str]:
    try:
        with _ragged_rows_located(path, format), _csv_input(path) as stream:
            return pa_csv.open_csv(stream, parse_options=_csv_parsing(format)).schema.names
    except UnicodeDecodeError:
        raise LorafitError(f"{path}: the header row is not valid UTF-8; re-save the file as UTF-8") from None


def _csv_parsing(format: str) -> pa_csv.ParseOptions:
    # quoted cells may hold newlines: a chat reply usually does
    return pa_csv.ParseOptions(delimiter=DELIMITERS[format], newlines_in_values=True)


def _csv_batches(path: Path, format: str) -> Iterator[pa.RecordBatch]:
    """Every column as text, so '42' stays the string a user typed; an empty cell is null (an absent field)."""
    names = _csv_header(path, format)
    converting = pa_csv.ConvertOptions(column_types={name: pa.string() for name in names}, strings_can_be_null=True)
    with _ragged_rows_located(path, format), _csv_input(path) as stream:
        yield from pa_csv.open_csv(stream, parse_options=_csv_parsing(format), convert_options=converting)


@contextmanager
def _ragged_rows_located(path: Path, format: str) -> Iterator[None]:
    """pyarrow's message for a row with the wrong number of cells does not say where; this one does."""
    try:
        yield
    except pa.ArrowInvalid:
        ragged = _ragged_row(path, format)
        if ragged:
            raise LorafitError(ragged) from None
        raise


def _ragged_row(path: Path, format: str) -> str | None:
    """Where the first row with a wrong number of cells is, read again with Python's csv module (it counts lines)."""
    name = "a tab" if format == "tsv" else "a comma"
    try:
        with io.TextIOWrapper(open_bytes(path), encoding="utf-8-sig", newline="") as text:
            reader = csv.reader(text, delimiter=DELIMITERS[format])
            expected = len(next(reader, []))
            rows = (cells for cells in reader if cells)  # pyarrow skips blank lines
            for index, cells in enumerate(rows):
                if len(cells) != expected:
                    plural = "s" if len(cells) != 1 else ""
                    return (
                        f"{path}[row {index}] (line {reader.line_num}): {len(cells)} cell{plural}, but the header "
                        f"has {expected}; quote any cell that holds {name}"
                    )
    except (UnicodeDecodeError, csv.Error):
        return None
    return None


def dataset_records(folder: Path, batch_size: int) -> Iterator[tuple[str, object]]:
    """The rows of a datasets save_to_disk folder as 'folder[index]', the index ds[index] would take."""
    dataset = _load_from_disk(folder)
    index = 0
    for table in dataset.with_format("arrow").iter(batch_size=batch_size):
        for row in table.to_pylist():
            yield f"{folder}[{index}]", without_nulls(row)
            index += 1


def dataset_schema(folder: Path) -> pa.Schema:
    return _load_from_disk(folder).data.schema


def _load_from_disk(folder: Path):
    import datasets  # slow to import, and needed only for save_to_disk folders

    try:
        return datasets.load_from_disk(str(folder))
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as err:
        raise LorafitError(f"{folder}: datasets.load_from_disk cannot read it: {first_line(err)}") from None


@contextmanager
def _explained(path: Path, format: str) -> Iterator[None]:
    """Turn what pyarrow raises about a broken file into one line naming the file and what pyarrow said."""
    try:
        yield
    except (pa.ArrowException, OSError) as err:
        raise LorafitError(f"{path}: cannot read it as {format}: {first_line(err)}") from None
