"""Atomic writes: a full disk is one line and leaves the old files intact; files get the usual permissions."""

import os
import stat

import pytest
from safetensors import SafetensorError

import lorafit
from lorafit import LoraConfig, LorafitError
from lorafit.files import apply_default_permissions, explain_write_errors
from lorafit.formats import peft as lorafit_io
from tests.conftest import mounted_tmpfs, randomize_adapters, tiny_llama

NAMES = ["adapter_config.json", "adapter_model.safetensors"]


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _small_adapter_model():
    model = lorafit.attach(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_adapters(model)
    return model


def _large_adapter_model():
    """About 1 MiB of adapter tensors: more than the small filesystem below holds."""
    model = tiny_llama(hidden_size=128, intermediate_size=256)
    return lorafit.attach(model, LoraConfig(r=64, target_modules="all-linear"))


def _contents(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("message, reason", [
    ("Error while serializing: I/O error: No space left on device (os error 28)", "no space left on the device"),
    ('IoError(Os { code: 13, kind: PermissionDenied, message: "Permission denied" })', "permission denied"),
])
def test_safetensors_os_errors_are_one_line(tmp_path, message, reason):
    target = tmp_path / "x.safetensors"
    with pytest.raises(LorafitError, match=rf"^cannot write {target}: {reason}; what was there before is intact$"):
        with explain_write_errors(target):
            raise SafetensorError(message)


def test_other_safetensors_errors_pass_through(tmp_path):
    with pytest.raises(SafetensorError, match="invalid dtype"):
        with explain_write_errors(tmp_path / "x.safetensors"):
            raise SafetensorError("invalid dtype")


def test_disk_full_while_saving_keeps_the_previous_adapter(tmp_path, monkeypatch):
    """The failure is injected: save_file writes part of the file, then fails as safetensors does."""
    folder = lorafit.save_adapter(_small_adapter_model(), tmp_path / "adapter")
    before = _contents(folder)

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as partial:
            partial.write(b"\0" * 1000)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(lorafit_io, "save_file", full_disk)
    with pytest.raises(LorafitError, match=rf"^cannot write {folder / NAMES[1]}: no space left on the device"):
        lorafit.save_adapter(_large_adapter_model(), folder)
    assert _contents(folder) == before  # byte-identical, and no temporary file beside them


@pytest.fixture
def small_filesystem(tmp_path):
    """A 256 KiB tmpfs, where the test may mount one (root on Linux); skipped elsewhere."""
    with mounted_tmpfs(tmp_path / "small", "size=256k") as folder:
        yield folder


def test_disk_full_on_a_real_filesystem_keeps_the_previous_adapter(small_filesystem):
    folder = lorafit.save_adapter(_small_adapter_model(), small_filesystem / "adapter")
    before = _contents(folder)
    with pytest.raises(LorafitError, match=rf"^cannot write {folder / NAMES[1]}: no space left on the device"):
        lorafit.save_adapter(_large_adapter_model(), folder)
    assert _contents(folder) == before


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def test_saved_adapter_files_get_the_mode_open_would_give(tmp_path, umask):
    folder = lorafit.save_adapter(_small_adapter_model(), tmp_path / "adapter")
    with open(folder / "reference", "w"):
        pass
    expected = _mode(folder / "reference")
    assert expected == 0o666 & ~umask
    assert {name: _mode(folder / name) for name in NAMES} == {name: expected for name in NAMES}


def test_apply_default_permissions_gives_a_tree_the_modes_of_new_files_and_folders(tmp_path, umask):
    tree = tmp_path / "merged"
    (tree / "sub").mkdir(parents=True)
    (tree / "model.safetensors").write_bytes(b"x")
    (tree / "sub" / "tokenizer.json").write_text("{}")
    outside = tmp_path / "outside"
    outside.write_text("not ours")
    (tree / "link").symlink_to(outside)
    for path, mode in ((tree, 0o700), (tree / "sub", 0o700), (tree / "model.safetensors", 0o600),
                       (tree / "sub" / "tokenizer.json", 0o600), (outside, 0o640)):
        os.chmod(path, mode)  # what tempfile.mkdtemp and safetensors leave

    apply_default_permissions(tree)

    (tmp_path / "new-folder").mkdir()
    with open(tmp_path / "new-file", "w"):
        pass
    folder_mode, file_mode = _mode(tmp_path / "new-folder"), _mode(tmp_path / "new-file")
    assert (_mode(tree), _mode(tree / "sub")) == (folder_mode, folder_mode)
    assert (_mode(tree / "model.safetensors"), _mode(tree / "sub" / "tokenizer.json")) == (file_mode, file_mode)
    assert _mode(outside) == 0o640  # a link's target is not the tree's to change
