"""The prepared-data cache's files: written batch by batch and hashed as they go, checked before each use.

An entry is a folder in lorafit's cache (`$LORAFIT_CACHE/data/<key>`) holding one binary file per array
(data/prepared.py says what each holds), the conversations as JSON lines, and prepared.json: the format,
the key, each file's size and SHA-256, and the reader's notes. It is written in a temporary folder and
renamed into place when complete; an entry whose files do not match its manifest is never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from lorafit.data.encoding import CUT, FITS
from lorafit.errors import LorafitError, first_line
from lorafit.files import cache_dir

# Bump when the arrays' layout, the encoding (data/encoding.py) or the records' reading (data/records.py)
# changes what a cached entry holds: entries of another version are never used.
PREPARED_FORMAT = 2  # 2: the notes count records whose every reply is empty
MANIFEST = "prepared.json"
# array name -> numpy dtype of its elements
ARRAYS = {"tokens": np.int32, "trained": np.bool_, "starts": np.int64, "outcomes": np.uint8,
          "trained_counts": np.int32, "conversation_starts": np.int64}
CONVERSATIONS = "conversations.jsonl"
PER_TOKEN = ("tokens", "trained")  # read a slice at a time; the per-record arrays are read whole


class Writer:
    """Appends encoded batches to the arrays' files (or to memory), hashing every byte as it goes."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        names = [*ARRAYS, CONVERSATIONS]
        self.files = {name: (open(folder / _file_name(name), "wb") if folder else _MemoryFile()) for name in names}
        self.hashes = {name: hashlib.sha256() for name in names}
        self.token_count = 0
        self.conversation_bytes = 0
        self.records = 0
        self._write("starts", np.zeros(1, np.int64))
        self._write("conversation_starts", np.zeros(1, np.int64))

    def add(self, encoded: list, conversations: list[list[dict]]) -> None:
        keep = [record.outcome in (FITS, CUT) for record in encoded]
        ids = [record.ids for record, kept in zip(encoded, keep) if kept]
        trained = [record.trained for record, kept in zip(encoded, keep) if kept]
        lengths = np.asarray([len(record.ids) if kept else 0 for record, kept in zip(encoded, keep)], np.int64)
        counts = np.asarray([int(record.trained[1:].sum()) if kept else 0 for record, kept in zip(encoded, keep)],
                            np.int32)
        if ids:
            self._write("tokens", np.concatenate(ids).astype(np.int32, copy=False))
            self._write("trained", np.concatenate(trained).astype(np.bool_, copy=False))
        self._write("starts", self.token_count + np.cumsum(lengths))
        self.token_count += int(lengths.sum())
        self._write("outcomes", np.asarray([record.outcome for record in encoded], np.uint8))
        self._write("trained_counts", counts)
        lines = [json.dumps(conversation, ensure_ascii=False).encode() for conversation in conversations]
        self._write(CONVERSATIONS, b"".join(lines))
        self._write("conversation_starts", self.conversation_bytes + np.cumsum([len(line) for line in lines]))
        self.conversation_bytes += sum(len(line) for line in lines)
        self.records += len(encoded)

    def _write(self, name: str, data) -> None:
        raw = data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()
        self.files[name].write(raw)
        self.hashes[name].update(raw)

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()

    def finish(self, manifest: dict) -> tuple[dict, bytes] | None:
        """Close the files; in memory, return (arrays, conversations); on disk, write the manifest last."""
        for handle in self.files.values():
            if self.folder is not None:
                handle.flush()
                os.fsync(handle.fileno())
            handle.close()
        if self.records == 0:
            raise LorafitError("the data holds no records")
        if self.folder is None:
            arrays = {name: np.frombuffer(self.files[name].getvalue(), dtype) for name, dtype in ARRAYS.items()}
            return arrays, self.files[CONVERSATIONS].getvalue()
        manifest = {"format": PREPARED_FORMAT, **manifest, "records": self.records, "tokens": self.token_count,
                    "files": {_file_name(name): {"bytes": (self.folder / _file_name(name)).stat().st_size,
                                                 "sha256": digest.hexdigest()}
                              for name, digest in self.hashes.items()}}
        (self.folder / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        return None


class _MemoryFile:
    """A bytearray with a file's write/close, for data kept in memory."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, raw: bytes) -> None:
        self.buffer += raw

    def close(self) -> None:
        pass

    def getvalue(self) -> bytes:
        return bytes(self.buffer)


def _file_name(name: str) -> str:
    return name if name == CONVERSATIONS else f"{name}.bin"


# -- the cache -------------------------------------------------------------------------------------------
def data_cache_dir() -> Path:
    """Where prepared data is kept: `$LORAFIT_DATA_CACHE` (a disk with room for big data), else
    `$LORAFIT_CACHE/data`, else `~/.cache/lorafit/data`."""
    own = os.environ.get("LORAFIT_DATA_CACHE")
    return Path(own).expanduser() if own else cache_dir("data")


def read_entry(folder: Path, key: str, echo, fresh: bool = False) -> tuple[dict, np.ndarray, dict] | None:
    """(arrays, conversations, manifest) of the entry in `folder` (the per-token ones read as needed), if it is
    complete and every file matches its manifest; None (said with `echo` when an entry is there but damaged)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        if folder.exists() and not fresh:
            echo(f"warning: the prepared-data cache entry {folder} is incomplete; preparing the data again")
        return None
    why = _damage(folder, manifest_path, key, check_contents=not fresh)  # fresh: hashed while writing it
    if why:
        echo(f"warning: the prepared-data cache entry {folder} is damaged ({why}); preparing the data again")
        return None
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    arrays = {name: (FileArray if name in PER_TOKEN else _read)(folder / _file_name(name), dtype)
              for name, dtype in ARRAYS.items()}
    return arrays, FileArray(folder / CONVERSATIONS, np.uint8), manifest


def _damage(folder: Path, manifest_path: Path, key: str, check_contents: bool = True) -> str:
    """Why the entry cannot be trusted ('' when it can): unreadable manifest, another key or format, a file
    whose size or SHA-256 differs from what the manifest recorded when it was written."""
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != PREPARED_FORMAT or manifest.get("key") != key:
            return "another format or key"
        for name in [*(_file_name(n) for n in ARRAYS), CONVERSATIONS]:
            path, expected = folder / name, files[name]
            if path.stat().st_size != expected["bytes"]:
                return f"{name} has {path.stat().st_size} bytes, {expected['bytes']} were written"
            if check_contents and _sha256(path) != expected["sha256"]:
                return f"{name}'s SHA-256 differs from the one recorded"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return first_line(err)
    return ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class FileArray:
    """A 1-D array kept in its file and read a slice at a time (os.pread): the ids and masks of a whole dataset
    never enter the process's memory, mapped or not. Memory-mapping them would let the pages an epoch touches
    (and the kernel's fault-around beside each example) accumulate in the process's resident set."""

    def __init__(self, path: Path, dtype) -> None:
        self.path, self.dtype = path, np.dtype(dtype)
        self._fd = os.open(path, os.O_RDONLY)
        self._length = path.stat().st_size // self.dtype.itemsize

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, where: slice) -> np.ndarray:
        start, stop, step = where.indices(self._length)
        if step != 1:
            raise IndexError("FileArray reads contiguous slices only")
        size = max(stop - start, 0) * self.dtype.itemsize
        raw = os.pread(self._fd, size, start * self.dtype.itemsize) if size else b""
        if len(raw) != size:
            raise LorafitError(f"{self.path}: shorter than its manifest says; run `lorafit cache --clear-data`")
        return np.frombuffer(raw, dtype=self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.close(self._fd)


def _read(path: Path, dtype) -> np.ndarray:
    """A per-record array (a few bytes a record), read whole."""
    return np.fromfile(path, dtype=dtype)


# an entry's folder is named by its key; an interrupted preparation leaves tempfile.mkdtemp's ".<key[:16]>-XXXXXXXX"
ENTRY_NAME = re.compile(r"[0-9a-f]{64}|\.[0-9a-f]{16}-\w+")


def _is_entry(folder: Path) -> bool:
    """A folder this module wrote: an entry's (or a temporary folder's) name, holding only the files it writes."""
    known = {MANIFEST, CONVERSATIONS, *(_file_name(name) for name in ARRAYS)}
    return (folder.is_dir() and folder.parent == data_cache_dir() and ENTRY_NAME.fullmatch(folder.name) is not None
            and {path.name for path in folder.iterdir()} <= known)


def remove_entry(folder: Path) -> None:
    """Delete a cache entry: only a folder in the data cache whose name and files are ones this module writes."""
    if not _is_entry(folder):
        raise LorafitError(f"{folder}: not a prepared-data cache entry as lorafit writes them; remove it yourself")
    shutil.rmtree(folder)


def clear_data_cache() -> tuple[int, int]:
    """Remove every prepared-data entry (and leftovers of interrupted preparations); (entries, bytes) freed.

    Checked first, removed after: a folder lorafit did not write stops it before anything is removed.
    """
    root = data_cache_dir()
    if not root.is_dir():
        return 0, 0
    folders = [folder for folder in sorted(root.iterdir()) if folder.is_dir()]
    foreign = [folder for folder in folders if not _is_entry(folder)]
    if foreign:
        raise LorafitError(f"{foreign[0]}: not a prepared-data cache entry as lorafit writes them, so nothing was "
                           "removed; move it out of the cache folder (or point LORAFIT_DATA_CACHE elsewhere)")
    freed = sum(path.stat().st_size for folder in folders for path in folder.iterdir())
    for folder in folders:
        shutil.rmtree(folder)
    return len(folders), freed
