"""Atomic file writes: a file is either its old complete version or its new complete version.

Every file lorafit writes (adapters, merged models, checkpoints) goes to a temporary name in the same
folder, is flushed to disk, then renamed over the target; a crash at any moment leaves no half file.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Write failures a user can fix (free space, permissions), reported as one line instead of a traceback.
_USER_FIXABLE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                 errno.EACCES: "permission denied", errno.EROFS: "read-only file system"}


@contextmanager
def explain_write_errors(target: str | os.PathLike) -> Iterator[None]:
    """Turn out-of-space and permission errors while writing `target` into a LorafitError."""
    from lorafit.errors import LorafitError

    try:
        yield
    except OSError as err:
        if err.errno not in _USER_FIXABLE:
            raise
        raise LorafitError(f"cannot write {target}: {_USER_FIXABLE[err.errno]}; what was there before is intact") from err


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; when the block succeeds, move it onto `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with explain_write_errors(target):
            yield temporary
            _fsync(temporary)
            os.replace(temporary, target)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_json(target: str | os.PathLike, value) -> None:
    with atomic_path(target) as temporary:
        temporary.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
