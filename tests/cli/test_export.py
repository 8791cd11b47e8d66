"""`lorafit export` refuses what it cannot write faithfully, never replaces a file it did not write, and says
each problem in one line with nothing left behind."""

import shutil

import pytest

import lorafit
from lorafit.cli.main import main
from lorafit.models.gguf_cache import default_model_path
from tests.cli.test_train_trust import error_line
from tests.formats.conftest import make_adapter


def export(*args) -> int:
    return main(["export", *map(str, args)])


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def adapter(tiny_smollm, tmp_path_factory):
    return make_adapter(tiny_smollm, tmp_path_factory.mktemp("export") / "adapter")


@pytest.mark.parametrize("method, settings, named", [
    ("lora", {"use_dora": True}, "DoRA"),
    ("ia3", {}, "IA3"),
    ("bitfit", {"target_modules": ["q_proj"], "add_missing_bias": True}, "BitFit"),
])
def test_methods_without_a_llama_cpp_adapter_form_are_sent_to_the_merged_export(tiny_smollm, tmp_path, capsys,
                                                                                method, settings, named):
    adapter = make_adapter(tiny_smollm, tmp_path / "adapter", method=method, **settings)
    assert export("--adapter", adapter, "--output", tmp_path / "a.gguf") == 1
    line = error_line(capsys)
    assert f"a {named} adapter" in line and "no llama.cpp adapter form" in line and "--format gguf" in line
    assert not (tmp_path / "a.gguf").exists()
    # the merged export takes every one of them (BitFit's added biases too: tests/formats/test_in_llama_cpp.py)
    assert export("--adapter", adapter, "--format", "gguf", "--outtype", "f32", "--output", tmp_path / "m.gguf") == 0


def test_an_architecture_the_exporter_does_not_know_is_named_with_the_supported_ones(tmp_path, capsys):
    from lorafit.models.identity import base_identity
    from tests.families import tiny_family_model

    folder = tmp_path / "glm"
    tiny_family_model("glm").save_pretrained(folder)
    model = tiny_family_model("glm")
    lorafit.attach(model, lorafit.LoraConfig(target_modules=["q_proj"]))
    lorafit.save_adapter(model, tmp_path / "adapter", base_model=base_identity(tiny_family_model("glm"), str(folder)))
    assert export("--adapter", tmp_path / "adapter", "--output", tmp_path / "a.gguf") == 1
    line = error_line(capsys)
    assert "does not know the architecture 'glm' (GlmForCausalLM)" in line and "llama, mistral, granite" in line


def test_an_adapter_for_another_model_than_the_gguf_is_refused_naming_the_tensor(adapter, tmp_path, capsys):
    assert export("--adapter", adapter, "--model", default_model_path(), "--output", tmp_path / "a.gguf") == 1
    line = error_line(capsys)
    assert "blk.0.attn_k.weight" in line and "another model" in line and "192×576" in line and "32×64" in line
    assert not (tmp_path / "a.gguf").exists()


def test_an_existing_output_needs_overwrite_which_replaces_only_a_file_lorafit_wrote(adapter, tmp_path, capsys):
    output = tmp_path / "adapter.gguf"
    output.write_bytes(b"my own file")
    assert export("--adapter", adapter, "--output", output) == 1
    assert "exists; pass --overwrite" in error_line(capsys)
    assert export("--adapter", adapter, "--output", output, "--overwrite") == 1
    assert "was not written by `lorafit export`" in error_line(capsys)
    assert output.read_bytes() == b"my own file"

    shutil.copy(default_model_path(), output)  # a real GGUF, but not one lorafit wrote
    assert export("--adapter", adapter, "--output", output, "--overwrite") == 1
    assert "was not written by `lorafit export`" in error_line(capsys)
    assert output.read_bytes() == default_model_path().read_bytes()

    output.unlink()
    assert export("--adapter", adapter, "--output", output) == 0
    first = output.read_bytes()
    assert export("--adapter", adapter, "--output", output, "--outtype", "f32", "--overwrite") == 0
    assert output.read_bytes() != first and leftovers(tmp_path) == []


def test_the_base_gguf_itself_is_never_an_output(tmp_path, capsys):
    base = tmp_path / "base.gguf"
    shutil.copy(default_model_path(), base)
    adapter = make_adapter(None, tmp_path / "adapter", target_modules=["q_proj"], layers=[0])
    before = base.read_bytes()
    for flags in ([], ["--overwrite"], ["--format", "gguf", "--overwrite"]):
        assert export("--adapter", adapter, "--model", base, "--output", base, *flags) == 1
        assert "is the base model" in error_line(capsys)
    assert base.read_bytes() == before
    # written for another GGUF than the recorded base (a copy here): done, and said
    assert export("--adapter", adapter, "--model", base, "--output", tmp_path / "a.gguf") == 0
    assert f"written for {base} (its architecture and every adapted tensor's shape checked, its weights not " \
           "compared)" in capsys.readouterr().out


def test_bad_settings_are_one_line_each_and_write_nothing(adapter, tiny_chat_model, tmp_path, capsys):
    assert export("--adapter", adapter, "--outtype", "q8_0", "--output", tmp_path / "a.gguf") == 1
    assert "--outtype q8_0 is for merged models" in error_line(capsys)
    assert export("--adapter", adapter, "--output", tmp_path / "a.safetensors") == 1
    assert "ending in .gguf" in error_line(capsys)
    assert export("--adapter", adapter, "--output", tmp_path) == 1
    assert "is a folder" in error_line(capsys)
    assert export("--adapter", tmp_path / "nowhere", "--output", tmp_path / "a.gguf") == 1
    assert "no such folder" in error_line(capsys)
    assert export("--adapter", adapter, "--format", "ggml", "--output", tmp_path / "a.gguf") == 1
    assert "--format 'ggml' is unknown" in error_line(capsys)
    # a tokenizer whose pre-tokenizer llama.cpp has no name for (byte-level without GPT-2's regex)
    byte_adapter = make_adapter(tiny_chat_model, tmp_path / "byte-adapter", zero=True)
    assert export("--adapter", byte_adapter, "--format", "gguf", "--output", tmp_path / "m.gguf") == 1
    assert "does not know llama.cpp's name for the pre-tokenizer" in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["byte-adapter"]


def test_a_merged_value_beyond_float16_fails_in_one_line_with_no_file_left(tiny_smollm, tmp_path, capsys):
    adapter = make_adapter(tiny_smollm, tmp_path / "adapter", scale=300.0)  # B·A reaches ~1e5 > 65504
    assert export("--adapter", adapter, "--format", "gguf", "--output", tmp_path / "m.gguf") == 1
    assert "beyond float16's range; use --outtype bf16 or f32" in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert export("--adapter", adapter, "--format", "gguf", "--outtype", "bf16", "--output", tmp_path / "m.gguf") == 0


def test_a_cached_conversion_folder_as_model_exports_against_the_gguf_it_came_from(tmp_path, capsys):
    """--model naming the folder lorafit converted the embedded GGUF into: the adapter is checked against, and the
    merged file carried over from, that GGUF (its metadata marker says which); a plain folder has none."""
    from lorafit.models.gguf_cache import source_gguf
    from lorafit.models.loading import resolve_model_folder

    folder = resolve_model_folder(None)
    assert source_gguf(str(folder)) == default_model_path().resolve()
    assert source_gguf(str(tmp_path)) is None
    adapter = make_adapter(None, tmp_path / "adapter", target_modules=["q_proj"], layers=[0])
    assert export("--adapter", adapter, "--model", folder, "--output", tmp_path / "a.gguf") == 0
    assert f"llama-cli -m {default_model_path().resolve()} --lora" in capsys.readouterr().out
