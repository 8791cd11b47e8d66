"""`lorafit merge` never writes over its inputs or over folders it did not write, and fails in one line."""

import json
import shutil

import pytest
from transformers import AutoModelForCausalLM

import lorafit
from lorafit.cli.main import main
from tests.cli.test_train_trust import error_line, snapshot
from tests.conftest import mounted_tmpfs, write_tiny_chat_model


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    model = write_tiny_chat_model(root / "model")
    adapted = AutoModelForCausalLM.from_pretrained(model)
    lorafit.attach(adapted, lorafit.LoraConfig(target_modules=["q_proj", "v_proj"]))
    adapter = lorafit.save_adapter(adapted, root / "adapter")
    return model, adapter


@pytest.mark.parametrize("where", ["model", "parent-of-model", "adapter"])
def test_output_that_is_or_holds_an_input_is_refused(base_and_adapter, where, capsys):
    model, adapter = base_and_adapter
    output = {"model": model, "parent-of-model": model.parent, "adapter": adapter}[where]
    before = snapshot(output)
    assert main(["merge", "--model", str(model), "--adapter", str(adapter), "--output", str(output),
                 "--overwrite"]) == 1
    assert "merging there would replace it" in error_line(capsys)
    assert snapshot(output) == before


def test_overwrite_replaces_an_earlier_merge_but_not_a_folder_with_other_files(base_and_adapter, tmp_path, capsys):
    model, adapter = base_and_adapter
    output = tmp_path / "merged"
    args = ["merge", "--model", str(model), "--adapter", str(adapter), "--output", str(output)]
    assert main(args) == 0
    record = json.loads((output / "lorafit-merge.json").read_text())
    assert "config.json" in record["files"] and record["adapter"] == str(adapter.resolve())
    assert main(args + ["--overwrite"]) == 0  # lorafit's own output: replaced
    (output / "my-notes.md").write_text("mine")
    before = snapshot(output)
    assert main(args + ["--overwrite"]) == 1
    assert "holds files lorafit did not write (my-notes.md)" in error_line(capsys)
    assert snapshot(output) == before

    user_model = tmp_path / "user-model"
    shutil.copytree(model, user_model)  # a model folder of the user's, not written by merge
    assert main(["merge", "--model", str(model), "--adapter", str(adapter), "--output", str(user_model),
                 "--overwrite"]) == 1
    assert "was not written by `lorafit merge`" in error_line(capsys)


def test_merged_files_are_readable_like_any_file_the_user_writes(base_and_adapter, tmp_path):
    model, adapter = base_and_adapter
    output = tmp_path / "merged"
    assert main(["merge", "--model", str(model), "--adapter", str(adapter), "--output", str(output)]) == 0
    probe = tmp_path / "probe"
    probe.write_text("x")
    expected = probe.stat().st_mode & 0o777
    assert {p.name: p.stat().st_mode & 0o777 for p in output.iterdir()} == {p.name: expected for p in output.iterdir()}
    (tmp_path / "folder-probe").mkdir()
    assert output.stat().st_mode & 0o777 == (tmp_path / "folder-probe").stat().st_mode & 0o777


def test_a_full_disk_while_merging_is_one_line_and_leaves_nothing_behind(base_and_adapter, tmp_path, capsys):
    model, adapter = base_and_adapter
    with mounted_tmpfs(tmp_path / "small", "size=64k") as mount:
        assert main(["merge", "--model", str(model), "--adapter", str(adapter), "--output",
                     str(mount / "merged")]) == 1
        assert "no space left on the device" in error_line(capsys)
        assert list(mount.iterdir()) == []  # the half-written temporary folder is gone


def test_a_save_failure_reported_by_safetensors_is_one_line_everywhere(base_and_adapter, tmp_path, capsys,
                                                                      monkeypatch):
    """The injected form of the test above, for machines where no tmpfs can be mounted."""
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    model, adapter = base_and_adapter

    def full_disk(self, folder, *args, **kwargs):
        (tmp_path / "merged" / "partial").parent.mkdir(exist_ok=True)
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    assert main(["merge", "--model", str(model), "--adapter", str(adapter), "--output", str(tmp_path / "out")]) == 1
    assert "cannot write" in error_line(capsys)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
