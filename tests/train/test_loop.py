"""The training loop: determinism, exact resume, token-weighted accumulation, guards, interrupts."""

import json
import os
import signal

import pytest
import torch

import lorafit
from lorafit import LoraConfig, LorafitError
from lorafit.data.tokenizing import IGNORE_INDEX, TokenizedExample
from lorafit.train.checkpoint import list_checkpoints
from lorafit.train.loop import LoopSettings, train
from tests.conftest import random_examples, tiny_llama


def _examples(count=24, seed=0):
    return random_examples(count, seed, lengths=(4, 16))


def _model(dropout=0.1):
    model = tiny_llama()
    torch.manual_seed(0)
    lorafit.attach(model, LoraConfig(r=4, dropout=dropout, target_modules="all-linear"))
    return model


def _train(tmp_path, steps=8, resume=None, model=None, examples=None, **settings):
    model = model or _model()
    settings = LoopSettings(**{"steps": steps, "batch_size": 4, "grad_accum": 2, "lr": 5e-3, "warmup_steps": 2,
                               "save_every": 3, **settings})
    result = train(model, examples or _examples(), settings, tmp_path, pad_id=0, vocab_size=64, resume=resume,
                   echo=lambda _: None)
    return result, model


def _adapter(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_same_seed_same_losses_and_the_loss_goes_down(tmp_path):
    first, _ = _train(tmp_path / "a", steps=12)
    second, _ = _train(tmp_path / "b", steps=12)
    assert first.losses == second.losses
    assert sum(first.losses[-3:]) < sum(first.losses[:3])


def test_resume_is_exact_bit_for_bit(tmp_path):
    full, full_model = _train(tmp_path / "full")
    _train(tmp_path / "cut", steps=8)  # writes checkpoints at 3, 6 and 8
    checkpoints = list_checkpoints(tmp_path / "cut" / "checkpoints")
    assert [c.name for c in checkpoints] == ["step-000006", "step-000008"]  # keep_checkpoints=2
    resumed, resumed_model = _train(tmp_path / "cut", resume=checkpoints[0])
    assert resumed.losses == full.losses[6:]
    for name, value in _adapter(full_model).items():
        assert torch.equal(value, _adapter(resumed_model)[name]), name
    steps_logged = [int(line.split('"step": ')[1].split(",")[0])
                    for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, 9))  # the redone steps replaced the old lines


def test_accumulation_weights_every_label_token_equally(tmp_path):
    # 4 examples of very different label counts: one step of batch 4 == one step of 2 x 2 accumulated
    examples = [TokenizedExample(list(range(1, 11)), [IGNORE_INDEX] * 9 + [10]), TokenizedExample(list(range(5, 25)), list(range(5, 25))),
                TokenizedExample(list(range(2, 8)), [IGNORE_INDEX, 3, 4, 5, 6, 7]), TokenizedExample(list(range(9, 13)), [IGNORE_INDEX] * 3 + [12])]
    big = _model(dropout=0.0)
    _train(tmp_path / "big", steps=1, model=big, examples=examples, batch_size=4, grad_accum=1, warmup_steps=0)
    small = _model(dropout=0.0)
    _train(tmp_path / "small", steps=1, model=small, examples=examples, batch_size=2, grad_accum=2, warmup_steps=0)
    for name, value in _adapter(big).items():
        torch.testing.assert_close(_adapter(small)[name], value, atol=1e-6, rtol=1e-5)


def test_lora_plus_gives_b_its_own_learning_rate(tmp_path):
    from lorafit.methods import LoraOptions
    from lorafit.methods.lora.method import learning_rate_ratios
    from lorafit.train.setup import parameter_groups

    ratios = learning_rate_ratios(LoraOptions(lora_plus_ratio=16))  # the method says which tensors LoRA+ speeds up
    groups, names = parameter_groups(_model(), LoopSettings(steps=1, lr=1e-3, lr_ratios=ratios))
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    assert all(".lora_B." in n for n in names[len(groups[0]["params"]):])


def test_a_nan_loss_stops_with_the_step_number_or_is_skipped(tmp_path):
    model = _model()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B["default"].fill_(float("nan"))
    with pytest.raises(LorafitError, match="non-finite step 1: loss nan"):
        _train(tmp_path / "stop", model=model)
    # skipping every step learns nothing: that is an error too, and no final checkpoint is written
    with pytest.raises(LorafitError, match=r"every step of this run \(2\) had a non-finite loss"):
        _train(tmp_path / "skip", steps=2, model=model, on_nonfinite="skip")
    assert not (tmp_path / "skip" / "checkpoints" / "step-000002").exists()
    log = [json.loads(line) for line in (tmp_path / "skip" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1] and log[0]["skipped"].startswith("loss nan")


@pytest.mark.parametrize("failure", ["loss", "weights"])
def test_the_model_leaves_checkpointing_and_training_mode_when_the_nonfinite_guard_stops_the_run(
        tmp_path, monkeypatch, failure):
    model = _model()
    if failure == "loss":
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.lora_B["default"].fill_(float("nan"))
        expected = "non-finite step 1: loss nan"
    else:  # a step taken that leaves NaN/Inf weights
        monkeypatch.setattr("lorafit.train.loop.weights_are_finite", lambda parameters: False)
        expected = "step 1 made the adapter's weights NaN/Inf"
    real_clip, during_the_step = torch.nn.utils.clip_grad_norm_, []

    def clip_and_note_the_mode(*args, **kwargs):
        during_the_step.append((model.training, any(getattr(m, "gradient_checkpointing", False)
                                                    for m in model.modules())))
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_note_the_mode)
    with pytest.raises(LorafitError, match=expected):
        _train(tmp_path, model=model, gradient_checkpointing=True)
    assert during_the_step == [(True, True)]
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert not model.training


def test_skipped_steps_are_counted_and_logged_and_the_rest_train(tmp_path, monkeypatch):
    real_clip, calls = torch.nn.utils.clip_grad_norm_, []

    def nan_norm_on_second_step(*args, **kwargs):  # the loop clips once per optimizer step
        calls.append(1)
        norm = real_clip(*args, **kwargs)
        return norm * float("nan") if len(calls) == 2 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_norm_on_second_step)
    result, _ = _train(tmp_path / "run", steps=3, on_nonfinite="skip")
    assert result.steps_done == 3 and result.skipped_steps == 1 and len(result.losses) == 2
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert "skipped" in log[1] and "loss" in log[0] and "loss" in log[2]


def test_sigint_finishes_the_step_checkpoints_and_resume_completes_exactly(tmp_path, capsys):
    full, full_model = _train(tmp_path / "full", steps=6, save_every=0)
    calls = []

    def interrupt_at_step_two():
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return {}

    model = _model()
    settings = LoopSettings(steps=6, batch_size=4, grad_accum=2, lr=5e-3, warmup_steps=2, eval_every=1)
    result = train(model, _examples(), settings, tmp_path / "cut", pad_id=0, vocab_size=64,
                   evaluate=interrupt_at_step_two, echo=lambda _: None)
    assert result.interrupted and result.steps_done == 2
    # the hint names the run folder, which is what `lorafit train --resume` takes
    assert f"interrupted at step 2: checkpoint written; continue with --resume {tmp_path / 'cut'}" in \
        capsys.readouterr().out
    checkpoint = list_checkpoints(tmp_path / "cut" / "checkpoints")[-1]
    assert checkpoint.name == "step-000002"
    resumed, resumed_model = _train(tmp_path / "cut", steps=6, save_every=0, resume=checkpoint)
    assert resumed.losses == full.losses[2:]
    for name, value in _adapter(full_model).items():
        assert torch.equal(value, _adapter(resumed_model)[name])


def test_no_trainable_parameters_is_an_error(tmp_path):
    model = tiny_llama()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with pytest.raises(LorafitError, match="no trainable parameters"):
        _train(tmp_path, model=model)


@pytest.mark.parametrize("config", [
    LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True),
    LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init="pissa"),
    lorafit.IA3Config(),
    lorafit.BitFitConfig(target_modules=["q_proj", "up_proj"], add_missing_bias=True),
], ids=["dora", "pissa", "ia3", "bitfit"])
def test_every_method_trains_and_resumes_exactly(tmp_path, config):
    def fresh():
        model = tiny_llama()
        torch.manual_seed(0)
        return lorafit.attach(model, config)

    examples = _examples(count=8)  # one optimizer step is one epoch: every step sees the same 8 examples
    full, full_model = _train(tmp_path / "full", steps=6, model=fresh(), examples=examples, lr=2e-2)
    assert full.losses[-1] < full.losses[0]  # the same batch every step: the loss must fall
    _train(tmp_path / "cut", steps=6, model=fresh(), examples=examples, lr=2e-2)
    resumed, resumed_model = _train(tmp_path / "cut", steps=6, model=fresh(), examples=examples, lr=2e-2,
                                    resume=tmp_path / "cut" / "checkpoints" / "step-000003")
    assert resumed.losses == full.losses[3:]
    for name, value in _adapter(full_model).items():
        assert torch.equal(value, _adapter(resumed_model)[name]), name


def test_gradient_checkpointing_trains_like_the_plain_loop_and_is_switched_off_after(tmp_path):
    plain, _ = _train(tmp_path / "plain", steps=4, model=_model(dropout=0.0), save_every=100)
    checkpointed, model = _train(tmp_path / "checkpointed", steps=4, model=_model(dropout=0.0), save_every=100,
                                 gradient_checkpointing=True)
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_compiled_body_trains_like_the_eager_loop(tmp_path, gradient_checkpointing):
    graphs = []

    def traced_then_run_eagerly(graph_module, example_inputs):  # a torch.compile backend that records its graphs
        graphs.append(graph_module)
        return graph_module.forward

    eager, _ = _train(tmp_path / "eager", steps=3, model=_model(dropout=0.0), save_every=100,
                      gradient_checkpointing=gradient_checkpointing)
    compiled, model = _train(tmp_path / "compiled", steps=3, model=_model(dropout=0.0), save_every=100,
                             gradient_checkpointing=gradient_checkpointing, compile_backend=traced_then_run_eagerly)
    assert graphs  # the loss ran the body through torch.compile
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)
    assert not hasattr(model.base_model, "_orig_mod")  # the model itself is left uncompiled


def test_compile_on_cpu_without_a_cxx_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("lorafit.train.setup.shutil.which", lambda name: None)
    with pytest.raises(LorafitError, match=r"--compile on CPU needs a C\+\+ compiler"):
        _train(tmp_path, steps=1, compile_backend="inductor")
    assert not (tmp_path / "log.jsonl").exists()  # refused before the run folder was written to


@pytest.mark.parametrize("warmup, total", [(0, 1), (0, 10), (10, 100), (3, 7), (5, 5), (8, 4)])
def test_the_schedule_gives_transformers_multipliers_step_for_step(warmup, total):
    """lorafit's own warm-up + cosine schedule against transformers' (the oracle, imported here only)."""
    from transformers import get_cosine_schedule_with_warmup

    from lorafit.train.setup import warmup_cosine_schedule

    def lrs(make) -> list:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
        schedule, seen = make(optimizer, warmup, total), []
        for _ in range(total + 3):
            seen.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
        return seen

    assert lrs(warmup_cosine_schedule) == lrs(get_cosine_schedule_with_warmup)


def test_training_imports_neither_peft_nor_bitsandbytes(tmp_path):
    """The loop runs without transformers' trainer utilities, which import both where they are installed."""
    import subprocess
    import sys

    code = ("import sys; from lorafit.train.loop import train; import lorafit.cli.train; "
            "print(sorted(m for m in ('peft', 'bitsandbytes', 'transformers.trainer_utils') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
