"""Atomic file writes: a file is either its old complete version or its new complete version.

Every file lorafit writes (adapters, merged models, checkpoints) goes to a temporary name in the same
folder, is flushed to disk, then renamed over the target; a crash at any moment leaves no half file.
Written files get the permissions `open(..., "w")` would give (0o666 less the umask), whatever the
library that wrote the temporary file chose (safetensors creates its files 0600).
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from lorafit.errors import LorafitError


def cache_dir(kind: str) -> Path:
    """lorafit's cache folder for one kind of entry ("models", "data"): `$LORAFIT_CACHE/<kind>`, else
    `$XDG_CACHE_HOME/lorafit/<kind>` or `~/.cache/lorafit/<kind>`. Everything in it can be rebuilt."""
    root = os.environ.get("LORAFIT_CACHE")
    if root:
        return Path(root).expanduser() / kind
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lorafit" / kind


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Write failures a user can fix (free space, permissions), reported as one line instead of a traceback.
USER_FIXABLE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                errno.EROFS: "read-only file system"}

# safetensors (and so transformers' save_pretrained) reports I/O failures as a SafetensorError whose
# text carries Rust's rendering of the OS error: "... (os error 28)" or "Os { code: 28, ... }".
_OS_ERROR_CODE = re.compile(r"os error (\d+)|code: (\d+)")


def _errno_of(err: BaseException) -> int | None:
    """The OS error number behind a write failure, if it has one."""
    if isinstance(err, OSError):
        return err.errno
    if isinstance(err, SafetensorError):
        found = _OS_ERROR_CODE.search(str(err))
        if found:
            return int(found.group(1) or found.group(2))
    return None


@contextmanager
def explain_write_errors(target: str | os.PathLike) -> Iterator[None]:
    """Turn out-of-space and permission errors while writing `target` into a LorafitError."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        code = _errno_of(err)
        if code not in USER_FIXABLE:
            raise
        raise LorafitError(f"cannot write {target}: {USER_FIXABLE[code]}; what was there before is intact") from err


def _umask() -> int:
    """The process umask, read without changing it where the system allows.

    The os.umask round trip briefly sets the umask of the whole process, which a thread creating a file
    at that moment would see; Linux publishes it in /proc/self/status, so that is tried first.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode() -> int:
    """What a new file gets from open(..., "w"): 0o666 less the umask."""
    return 0o666 & ~_umask()


def _folder_mode() -> int:
    """What a new folder gets from mkdir: 0o777 less the umask."""
    return 0o777 & ~_umask()


def apply_default_permissions(folder: str | os.PathLike) -> None:
    """Give `folder` and everything under it the modes open() and mkdir() would have given.

    For output folders built by other libraries (tempfile.mkdtemp makes 0700 folders, safetensors 0600
    files) so that another user, such as a serving process, can read them as the umask intends.
    Symbolic links are left alone and not followed.
    """
    file_mode, folder_mode = _file_mode(), _folder_mode()
    os.chmod(folder, folder_mode)
    for root, folders, files in os.walk(folder):
        for name in folders:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, folder_mode)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; when the block succeeds, move it onto `target`.

    The file written in the block gets the default mode (see the module docstring) before the rename.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with explain_write_errors(target):
            yield temporary
            os.chmod(temporary, _file_mode())
            _fsync(temporary)
            os.replace(temporary, target)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json(target: str | os.PathLike, value, sort_keys: bool = True) -> None:
    write_text(target, json.dumps(value, indent=2, sort_keys=sort_keys) + "\n")


def is_inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or somewhere under it (both resolved: links and '..' followed)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def check_writable(folder: Path) -> None:
    """Fail now, before a model is loaded, if `folder` cannot be created or written."""
    existing = folder
    while not existing.exists():
        if existing.is_symlink():
            raise LorafitError(f"--output {folder}: {existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"is under {existing}, which is a file"
        raise LorafitError(f"--output {folder} {where}; give a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".lorafit-write-check-", dir=existing)
    except OSError as err:
        reason = USER_FIXABLE.get(err.errno, err.strerror)
        raise LorafitError(f"--output {folder}: cannot write in {existing}: {reason}") from None
    os.rmdir(probe)
