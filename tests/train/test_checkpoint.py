"""Checkpoints: read and checked before anything is applied; a damaged one is one line; a checkpoint is an adapter."""

import json

import pytest
import torch
from safetensors import SafetensorError
from transformers import get_cosine_schedule_with_warmup

import lorafit
from lorafit import LorafitError
from lorafit.train.checkpoint import (
    Position,
    list_checkpoints,
    newest_readable,
    read_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from tests.conftest import randomize_adapters, tiny_llama


def _trained(init="default"):
    model = tiny_llama()
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init=init))
    randomize_adapters(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 1, 100)
    model(torch.randint(0, 64, (1, 8)), labels=torch.randint(0, 64, (1, 8))).loss.backward()
    optimizer.step(); scheduler.step(); optimizer.zero_grad()
    return model, names, optimizer, scheduler


def _save(folder, step, model, names, optimizer, scheduler, keep=3):
    return save_checkpoint(folder, Position(step, 0, step), model, "default", optimizer, scheduler, names, keep)


def _edit_state(checkpoint, change):
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))


@pytest.mark.parametrize("damage, message", [
    (lambda c: _edit_state(c, lambda s: s.pop("scheduler")), "trainer_state.json has no 'scheduler'"),
    (lambda c: _edit_state(c, lambda s: s.update(parameter_names="all")), "'parameter_names' is str, not list"),
    (lambda c: _edit_state(c, lambda s: s["position"].update(epoch=-1)), "position.epoch is -1, not a count"),
    (lambda c: _edit_state(c, lambda s: s.update(python_rng=[3, [1], "x"])), "python_rng is not a Python random"),
    (lambda c: (c / "trainer_state.json").write_text('{"position": {"st'), "Unterminated string"),
    (lambda c: (c / "optimizer.safetensors").write_bytes(b"\x10\x00"), "is damaged"),
    (lambda c: (c / "training_state.safetensors").unlink(), "no training_state.safetensors"),
    (lambda c: (c / "rng.safetensors").unlink(), "is damaged"),
])
def test_a_damaged_checkpoint_is_one_line_naming_it(tmp_path, damage, message):
    model, names, optimizer, scheduler = _trained()
    checkpoint = _save(tmp_path, 1, model, names, optimizer, scheduler)
    damage(checkpoint)
    with pytest.raises(LorafitError, match=r"is damaged") as caught:
        read_checkpoint(checkpoint)
    assert message in str(caught.value) and str(checkpoint) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_newest_readable_passes_over_damaged_ones_and_says_so(tmp_path):
    model, names, optimizer, scheduler = _trained()
    for step in (1, 2, 3):
        _save(tmp_path, step, model, names, optimizer, scheduler)
    _edit_state(tmp_path / "step-000003", lambda s: s.pop("position"))
    notes = []
    found = newest_readable(tmp_path, notes.append)
    assert found.path.name == "step-000002" and found.position.step == 2
    assert len(notes) == 1 and "step-000003 is damaged" in notes[0]


def test_restoring_a_checkpoint_of_other_parameters_changes_nothing(tmp_path):
    model, names, optimizer, scheduler = _trained()
    checkpoint = _save(tmp_path, 1, model, names, optimizer, scheduler)
    other = tiny_llama()
    lorafit.attach(other, lorafit.LoraConfig(r=4, target_modules=["k_proj"]))
    other_names = [n for n, p in other.named_parameters() if p.requires_grad]
    other_optimizer = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=1e-3)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(LorafitError, match="made for other trainable parameters"):
        restore_checkpoint(read_checkpoint(checkpoint), other, other_optimizer,
                           get_cosine_schedule_with_warmup(other_optimizer, 1, 100), other_names)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


@pytest.mark.parametrize("failure", [
    OSError(28, "No space left on device"),
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
], ids=["oserror", "safetensors"])
def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    import lorafit.train.checkpoint as checkpoint_module

    model, names, optimizer, scheduler = _trained()
    _save(tmp_path, 1, model, names, optimizer, scheduler)
    real_save = checkpoint_module.save_file

    def full_disk(tensors, path, *args, **kwargs):
        if "optimizer" in str(path):
            raise failure
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    with pytest.raises(LorafitError, match="step-000002: no space left on the device; what was there before is intact"):
        _save(tmp_path, 2, model, names, optimizer, scheduler)
    assert [p.name for p in tmp_path.iterdir()] == ["step-000001"]  # no temporary folder left
    assert read_checkpoint(tmp_path / "step-000001").position.step == 1


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    model, names, optimizer, scheduler = _trained()
    _save(tmp_path, 1, model, names, optimizer, scheduler)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_A["default"][0, 0] = float("nan")
    with pytest.raises(LorafitError, match="refusing to checkpoint non-finite weights"):
        _save(tmp_path, 2, model, names, optimizer, scheduler)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_a_checkpoint_loads_as_the_adapter_it_holds(tmp_path, init, input_ids):
    model, names, optimizer, scheduler = _trained(init)
    checkpoint = _save(tmp_path / "checkpoints", 1, model, names, optimizer, scheduler)
    with torch.no_grad():
        expected = model(input_ids).logits
    loaded = lorafit.load_adapter(tiny_llama(), checkpoint)  # the untouched base: PiSSA's file form applies to it
    with torch.no_grad():
        assert (loaded(input_ids).logits - expected).abs().max() <= 1e-5
