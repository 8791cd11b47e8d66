"""What --data names, resolved to the files it reads: one file, a folder of shards, a glob, or a datasets folder.

A DataSource knows its files and their one format, describes itself for the settings line, fingerprints
every byte it reads (so a run records exactly what it trained on), and streams its raw records with
their places. Turning records into conversations is records.py's job; this module only finds and reads.

A folder of shards is read by these rules: its own files only (not subfolders: give a glob such as
'data/**/*.parquet' for those), sorted by name; names starting with '.' or '_' are skipped (hidden files,
Spark's _SUCCESS); files whose extension is not a data format (README.md) are skipped and named by
describe(); a .json file next to other data files is metadata and skipped likewise; a held-out split's
file ('test.jsonl') next to others is refused, since a folder is read whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from glob import glob
from pathlib import Path

import pyarrow as pa

from lorafit.data.json_records import (
    first_character,
    json_kind,
    json_list_records,
    jsonl_records,
)
from lorafit.data.tables import (
    dataset_records,
    dataset_schema,
    table_records,
    table_schema,
)
from lorafit.errors import LorafitError, brief

FORMAT_BY_EXTENSION = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "tsv",
                       ".arrow": "arrow"}
ACCEPTED = (".jsonl, .json, .parquet, .csv, .tsv, .arrow (the text ones also gzipped, e.g. .jsonl.gz), "
            "a folder of such files, a glob, or a datasets save_to_disk folder")
JSON_FORMATS = ("json", "jsonl")
HELD_OUT_SPLITS = ("validation", "test")  # the DatasetDict splits held_out_split looks for, in order
HELD_OUT_WORDS = {"test", "validation", "valid", "val", "dev", "eval"}
_GLOB_CHARACTERS = re.compile(r"[*?[]")
UNREADABLE = (OSError, EOFError, zlib.error)  # a file we may not read, or a broken gzip stream


@dataclass(frozen=True)
class DataSource:
    """The files one --data spec reads, their format, and how to read them a batch at a time.

    `files` holds every file whose bytes are read (for a datasets folder: its arrow files and its json
    metadata), in reading order; `root` is the folder their names in fingerprint() are relative to.
    """

    spec: str
    kind: str  # "file", "folder", "glob" or "datasets"
    format: str  # jsonl, json, parquet, csv, tsv, arrow or datasets
    files: tuple[Path, ...]
    root: Path
    split: str | None = None  # the DatasetDict split read; None for everything else
    skipped: tuple[Path, ...] = ()  # a folder's files that are not data, and its subfolders: named by describe()

    def describe(self) -> str:
        """One phrase for the settings line: what was named, its format, how much of it is read."""
        if self.kind == "datasets":
            split = f", split {self.split!r}" if self.split else ""
            return f"{self.spec} (datasets save_to_disk folder{split})"
        count = f"{len(self.files)} file{'s' if len(self.files) != 1 else ''}"
        names = [path.name + ("/" if path.is_dir() else "") for path in self.skipped]
        not_read = f"; not read: {brief(names)}" if names else ""
        return f"{self.spec} ({self.format}, {count}{not_read})"

    def fingerprint(self) -> str:
        """sha256 over every file's bytes in order, each after its name; a lone file's is its plain sha256.

        The plain sha256 for one file keeps fingerprints equal to what runs recorded before folders
        existed. Names and sizes go in before contents so that moving bytes between files changes it.
        """
        digest = hashlib.sha256()
        for path in self.files:
            if self.kind != "file":
                name = Path(os.path.relpath(path, self.root)).as_posix()
                digest.update(f"{name}\0{path.stat().st_size}\0".encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()

    @property
    def from_table(self) -> bool:
        """Whether records are table rows (every row has every column; a null is an absent field)."""
        return self.format not in JSON_FORMATS

    @property
    def text_cells(self) -> bool:
        """Whether every value is text as typed (CSV, TSV), so lists are written in cells as JSON text."""
        return self.format in ("csv", "tsv")

    @property
    def dataset_folder(self) -> Path:
        """The save_to_disk folder datasets loads: the split's folder for a DatasetDict."""
        return self.root / self.split if self.split else self.root

    def schemas(self) -> Iterator[tuple[str, pa.Schema]]:
        """Each table's name and columns, none for JSON: so columns can be checked before any row is read."""
        if self.kind == "datasets":
            yield str(self.dataset_folder), dataset_schema(self.dataset_folder)
        elif self.from_table:
            for path in self.files:
                yield str(path), table_schema(path, self.format)

    def record_batches(self, batch_size: int) -> Iterator[list[tuple[str, object]]]:
        """Lists of at most batch_size (place, raw record), read lazily: memory does not grow with the data.

        Places are 'file:line' (JSONL), 'file[index]' (JSON list, Parquet, Arrow; 0-based in that file),
        'file[row i]' (CSV/TSV: the i-th row after the header, 0-based) and 'folder[index]' (datasets).
        A table row is a dict without its nulls; a CSV cell is text, JSON text included (see columns.py).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        batch, read = [], 0
        for located in self._records(batch_size):
            batch.append(located)
            read += 1
            if len(batch) == batch_size:
                yield batch
                batch = []
        if not read:
            raise LorafitError(self._no_records())
        if batch:
            yield batch

    def _records(self, batch_size: int) -> Iterator[tuple[str, object]]:
        if self.kind == "datasets":
            yield from dataset_records(self.dataset_folder, batch_size)
            return
        for path in self.files:
            try:
                if self.format == "jsonl":
                    yield from jsonl_records(path)
                elif self.format == "json":
                    yield from json_list_records(path)
                else:
                    yield from table_records(path, self.format, batch_size)
            except UNREADABLE as err:
                raise _unreadable(path, err) from None

    def _no_records(self) -> str:
        if self.kind != "file":
            return f"{self.describe()}: no records (every file is empty)"
        if self.format == "jsonl":
            return f"{self.spec}: no records (the file is empty or holds only blank lines)"
        return f"{self.spec}: no records (an empty {'list' if self.format == 'json' else 'table'})"


def open_source(spec: str | os.PathLike, flag: str = "--data") -> DataSource:
    """Resolve what the user gave to `flag` (a file, a folder, a glob) to a DataSource; nothing is read yet.

    Formats are told by content where the bytes say (Parquet's 'PAR1', Arrow's 'ARROW1' or an IPC
    stream, a JSON list's '['), else by extension. A DatasetDict folder gives its 'train' split.
    """
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        return _open_folder(spec, path)
    if path.exists():
        return DataSource(spec, "file", file_format(path), (path,), path.parent)
    if _GLOB_CHARACTERS.search(spec):
        return _open_glob(spec, flag)
    raise LorafitError(f"data file not found: {path}")


def held_out_split(source: DataSource) -> DataSource | None:
    """A DatasetDict's 'validation' split, else its 'test' split, for the caller to hold out; None otherwise."""
    if source.kind != "datasets" or source.split is None:
        return None
    splits = _dict_splits(source.root)
    for split in HELD_OUT_SPLITS:
        if split in splits:
            return _dataset_source(source.spec, source.root, split)
    return None


def file_format(path: Path) -> str:
    """The data format of one file: by its first bytes where they tell, else by its extension."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
        if head.startswith(b"PAR1"):
            return "parquet"
        if head.startswith((b"ARROW1", b"\xff\xff\xff\xff")):  # the IPC file, or stream, format
            return "arrow"
        named = extension_format(path)
        if named in JSON_FORMATS or (named is None and first_character(path) in (b"{", b"[")):
            return json_kind(path)
    except UNREADABLE as err:
        raise _unreadable(path, err) from None
    if named is None:
        suffix = "".join(path.suffixes) or "no extension"
        raise LorafitError(f"{path}: not a data file type lorafit reads ({suffix}); accepted: {ACCEPTED}")
    return named


def extension_format(path: Path) -> str | None:
    """The format a file's name claims ('.gz' looked through), None when it names none."""
    name = path.name.lower().removesuffix(".gz")
    return FORMAT_BY_EXTENSION.get(Path(name).suffix)


def _unreadable(path: Path, err: BaseException) -> LorafitError:
    return LorafitError(f"{path}: cannot read the data file ({getattr(err, 'strerror', None) or err})")


def _open_folder(spec: str, folder: Path) -> DataSource:
    if (folder / "dataset_dict.json").is_file():
        splits = _dict_splits(folder)
        if "train" not in splits:
            raise LorafitError(
                f"{spec}: this datasets DatasetDict has no 'train' split (it has {', '.join(splits) or 'none'}); "
                f"give one split's folder instead, e.g. {folder / splits[0] if splits else folder}"
            )
        return _dataset_source(spec, folder, "train")
    if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
        return _dataset_source(spec, folder, None)
    return _open_shards(spec, folder)


def _dict_splits(folder: Path) -> list[str]:
    splits = _read_json(folder / "dataset_dict.json").get("splits")
    if not (isinstance(splits, list) and all(isinstance(split, str) for split in splits)):
        raise LorafitError(f"{folder / 'dataset_dict.json'}: no list of 'splits'; is this a datasets folder?")
    return splits


def _dataset_source(spec: str, root: Path, split: str | None) -> DataSource:
    folder = root / split if split else root
    state = _read_json(folder / "state.json")
    try:
        arrow_files = [folder / entry["filename"] for entry in state["_data_files"]]
    except (KeyError, TypeError):
        raise LorafitError(f"{folder / 'state.json'}: no '_data_files' list; is this a datasets folder?") from None
    metadata = (folder / "dataset_info.json", folder / "state.json")
    return DataSource(spec, "datasets", "datasets", (*arrow_files, *metadata), root, split)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LorafitError(f"{path}: missing; a datasets save_to_disk folder has one") from None
    except (OSError, ValueError) as err:
        raise LorafitError(f"{path}: cannot read it as JSON ({err})") from None
    if not isinstance(value, dict):
        raise LorafitError(f"{path}: expected a JSON object")
    return value


def _open_shards(spec: str, folder: Path) -> DataSource:
    """A folder's own data files; what is not data is kept in `skipped` (see the module's docstring)."""
    visible = sorted(path for path in folder.iterdir() if not path.name.startswith((".", "_")))
    files = [path for path in visible if path.is_file()]
    data = [path for path in files if extension_format(path)]
    if any(extension_format(path) != "json" for path in data):
        data = [path for path in data if extension_format(path) != "json"]
    if not data:
        raise LorafitError(
            f"{spec}: no data files in this folder (other files: {len(files)}, subfolders: "
            f"{len(visible) - len(files)}); accepted: {ACCEPTED}; for files in subfolders give a glob, "
            f"e.g. '{folder}/**/*.jsonl'"
        )
    _refuse_held_out_beside_training(spec, data)
    skipped = tuple(path for path in visible if path not in data)
    return DataSource(spec, "folder", _one_format(spec, data), tuple(data), folder, skipped=skipped)


def _refuse_held_out_beside_training(spec: str, files: list[Path]) -> None:
    """A folder holding 'train.jsonl' and 'test.jsonl' would train on its test data: refused, not guessed at."""
    held_out = [path for path in files if HELD_OUT_WORDS & set(re.split(r"[^a-z]+", path.name.lower()))]
    if held_out and len(held_out) < len(files):
        other = next(path for path in files if path not in held_out)
        word = re.match(r"[a-zA-Z]*", other.name).group()
        pattern = Path(spec) / (f"{word}*{''.join(other.suffixes)}" if word else other.name)
        raise LorafitError(
            f"{spec}: {held_out[0].name} looks like held-out data next to {other.name}, and a folder is read "
            f"whole; give the training files alone, e.g. '{pattern}'"
        )


def _one_format(spec: str, files: list[Path]) -> str:
    first_of: dict[str, Path] = {}
    for path in files:
        first_of.setdefault(file_format(path), path)
    if len(first_of) > 1:
        (one, one_path), (two, two_path) = list(first_of.items())[:2]
        raise LorafitError(
            f"{spec}: mixes data formats: {one_path.name} is {one}, {two_path.name} is {two}; "
            "keep one format together, or pick one with a glob"
        )
    return next(iter(first_of))


def _open_glob(spec: str, flag: str) -> DataSource:
    files = sorted(Path(match) for match in glob(spec, recursive=True) if Path(match).is_file())
    if not files:
        raise LorafitError(f"{flag} {spec}: the pattern matches no files")
    return DataSource(spec, "glob", _one_format(spec, files), tuple(files), _glob_root(spec))


def _glob_root(spec: str) -> Path:
    """The folder before a pattern's first wildcard: 'data/*/x.jsonl' -> 'data'."""
    parts = Path(spec).parts
    fixed = next((i for i, part in enumerate(parts) if _GLOB_CHARACTERS.search(part)), len(parts))
    return Path(*parts[:fixed]) if fixed else Path(".")
