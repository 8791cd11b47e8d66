"""The bad-input catalogue (README "Errors"): each mistake gives exit code 1 and one line naming the place.

Run through the real command line (`lorafit.cli.main.main`) on a tiny model folder, so what is tested is
what a user sees.
"""

import errno
import json

import pytest
import torch
from safetensors.torch import load_file

import lorafit
from lorafit.cli.main import main
from lorafit.data.tasks import generate_date_task
from tests.conftest import write_tiny_chat_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_chat_model):
    root = tmp_path_factory.mktemp("catalogue")
    data = root / "dates.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in generate_date_task(12, seed=1)))
    adapter = root / "adapter"
    model = lorafit.load_adapter  # noqa: F841 (keeps the import honest)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    lorafit.attach(base, lorafit.LoraConfig(target_modules=["q_proj", "v_proj"]))
    lorafit.save_adapter(base, adapter)
    return {"root": root, "data": data, "model": tiny_chat_model, "adapter": adapter}


def _fail(capsys, args) -> str:
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    # the progress bar may have drawn on stderr before the error; the error itself is one line
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _train(setup, *extra):
    return ["train", "--model", str(setup["model"]), "--data", str(setup["data"]), "--steps", "1",
            "--batch-size", "2", "--eval-examples", "1", "--max-new-tokens", "2",
            "--output", str(setup["root"] / "out"), "--overwrite", *extra]


def _write(setup, name, content: bytes):
    path = setup["root"] / name
    path.write_bytes(content)
    return path


def test_malformed_jsonl_names_the_line(setup, capsys):
    bad = _write(setup, "bad.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    err = _fail(capsys, _train(setup, "--data", str(bad)))
    assert f"{bad}:2: malformed JSON" in err


def test_empty_data_file(setup, capsys):
    empty = _write(setup, "empty.jsonl", b"")
    assert str(empty) in _fail(capsys, _train(setup, "--data", str(empty)))


def test_record_missing_the_needed_fields(setup, capsys):
    bad = _write(setup, "fields.jsonl", b'{"question": "a", "answer": "b"}\n')
    err = _fail(capsys, _train(setup, "--data", str(bad)))
    assert f"{bad}:1" in err and "'question'" in err and "'instruction'+'output' (alpaca)" in err


def test_non_utf8_text(setup, capsys):
    bad = _write(setup, "latin1.jsonl", '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    err = _fail(capsys, _train(setup, "--data", str(bad)))
    assert str(bad) in err and "UTF-8" in err and ":1" in err


def test_examples_longer_than_max_length_are_truncated_or_skipped_and_counted(setup, capsys):
    capsys.readouterr()
    # byte-level tokens: the examples are 110-125 long and their replies start after ~100 tokens
    # held-out examples are never truncated (their loss and exact match would score a cut reply): the one
    # held-out example does not fit, and that is an error naming it, before any file is written
    err = _fail(capsys, _train(setup, "--max-length", "108"))
    assert "the held-out part of" in err and "no held-out examples left" in err and "--max-length" in err
    assert main(_train(setup, "--max-length", "108", "--held-out", "0", "--eval-examples", "0")) == 0
    out = capsys.readouterr().out  # 12 train examples; one reply starts after token 108
    assert "kept 11 of 12 examples (11 truncated, 0 skipped as too long, 1 with no trained tokens)" in out
    assert "warning: 11 examples were cut to max_length" in out
    err = _fail(capsys, _train(setup, "--max-length", "108", "--overflow", "skip"))
    assert "no training examples left" in err and "longer than max_length=108 were skipped" in err


def test_examples_whose_labels_are_all_masked_are_dropped_and_counted(setup, capsys):
    err = _fail(capsys, _train(setup, "--max-length", "60"))  # the reply starts after token 100: nothing trained
    assert "11 had no trained tokens within max_length=60" in err


def test_targets_matching_nothing_name_the_closest_modules(setup, capsys):
    err = _fail(capsys, _train(setup, "--targets", "q_prj"))
    assert "target 'q_prj' matches no module" in err and "q_proj" in err


@pytest.mark.parametrize("flags, message", [
    (["--r", "0"], "--r must be >= 1"),
    (["--r", "1000"], "r=1000 is larger than min(in, out)"),
    (["--lr", "-0.1"], "--lr must be a finite number > 0"),
    (["--steps", "-3"], "--steps must be > 0"),
    (["--method", "loar"], "--method 'loar' is unknown (did you mean lora?)"),
    (["--train-head"], "--train-head is a BITFIT setting; --method lora does not use it"),
    (["--row-tokens", "0"], "--row-tokens must be >= 1"),
])
def test_bad_numbers_and_methods(setup, capsys, flags, message):
    assert message in _fail(capsys, _train(setup, *flags))


def test_model_path_that_does_not_exist_or_is_not_a_model(setup, capsys):
    assert "/no/such/model does not exist" in _fail(capsys, _train(setup, "--model", "/no/such/model"))
    not_model = setup["root"] / "not-a-model"
    not_model.mkdir(exist_ok=True)
    assert f"{not_model} is not a model folder: no config.json" in _fail(capsys, _train(setup, "--model", str(not_model)))


def test_adapter_made_for_another_base_model(setup, capsys, tmp_path):
    other = write_tiny_chat_model(tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config.update(hidden_size=48, head_dim=8)
    (other / "config.json").write_text(json.dumps(config))
    from transformers import AutoModelForCausalLM, LlamaConfig

    AutoModelForCausalLM.from_config(LlamaConfig(**config)).save_pretrained(other)
    err = _fail(capsys, ["eval", "--model", str(other), "--adapter", str(setup["adapter"]), "--data", str(setup["data"])])
    assert "q_proj.lora_A.weight has shape" in err and "made for another base model" in err


def _adapter_copy(setup, tmp_path):
    import shutil

    return shutil.copytree(setup["adapter"], tmp_path / "adapter")


def test_adapter_config_with_unknown_peft_type(setup, capsys, tmp_path):
    adapter = _adapter_copy(setup, tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "P_TUNING"}))
    err = _fail(capsys, ["eval", "--model", str(setup["model"]), "--adapter", str(adapter)])
    assert "peft_type 'P_TUNING' is not supported" in err and "adapter_config.json" in err


def test_truncated_safetensors_adapter(setup, capsys, tmp_path):
    adapter = _adapter_copy(setup, tmp_path)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    err = _fail(capsys, ["eval", "--model", str(setup["model"]), "--adapter", str(adapter)])
    assert f"{weights} is not a readable safetensors file" in err


def test_pickle_adapter_is_refused_without_allow_pickle(setup, capsys, tmp_path):
    adapter = _adapter_copy(setup, tmp_path)
    tensors = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter / "adapter_model.bin")
    err = _fail(capsys, ["eval", "--model", str(setup["model"]), "--adapter", str(adapter), "--data", str(setup["data"])])
    assert "adapter_model.bin is a pickle file" in err and "--allow-pickle" in err
    assert main(["eval", "--model", str(setup["model"]), "--adapter", str(adapter), "--data", str(setup["data"]),
                 "--allow-pickle", "--eval-examples", "1", "--max-new-tokens", "2"]) == 0


def test_existing_output_folder_is_refused(setup, capsys):
    out = setup["root"] / "existing"
    out.mkdir(exist_ok=True)
    (out / "keep.txt").write_text("mine")
    args = [a for a in _train(setup) if a != "--overwrite"]
    args[args.index("--output") + 1] = str(out)
    err = _fail(capsys, args)
    assert f"output folder {out} exists and is not empty; pass --overwrite to replace the run there, or --resume {out}" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_no_disk_space_while_saving_is_one_line_and_keeps_the_last_checkpoint(setup, capsys, monkeypatch):
    import lorafit.train.checkpoint as checkpoint

    real_save = checkpoint.save_file
    calls = []

    def full_disk_on_second_checkpoint(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 3:  # the first checkpoint (training state, optimizer and rng files) succeeds
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_disk_on_second_checkpoint)
    out = setup["root"] / "full-disk"
    args = _train(setup, "--steps", "2", "--save-every", "1")
    args[args.index("--output") + 1] = str(out)
    err = _fail(capsys, args)
    assert "step-000002: no space left on the device" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]
    lorafit.load_adapter(write_and_load_base(setup), out / "checkpoints" / "step-000001")


def write_and_load_base(setup):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(setup["model"])
