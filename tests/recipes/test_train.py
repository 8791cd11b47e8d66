"""The training recipe's own decisions: how many steps an epoch count means."""

import pytest

from lorafit.cli.main import main
from lorafit.errors import LorafitError
from lorafit.recipes.train import steps_for_epochs


@pytest.mark.parametrize("examples, batch, accum, epochs, steps", [
    (100, 8, 1, 1.0, 13),  # 13 micro-batches, the last one short
    (100, 8, 4, 1.0, 4),  # 13 micro-batches in steps of 4: the last step short
    (100, 8, 4, 2.5, 10),
    (2, 1, 2, 1.0, 1),  # one step is exactly the epoch
    (5, 8, 1, 3.0, 3),  # a batch larger than the data: one micro-batch of all 5 per step
])
def test_epochs_are_counted_in_optimizer_steps(examples, batch, accum, epochs, steps):
    assert steps_for_epochs(examples, batch, accum, epochs) == steps


def test_a_step_longer_than_an_epoch_is_refused_not_cycled():
    """2 examples, --batch-size 1, --grad-accum 50: one step would go over the data 25 times, not once."""
    with pytest.raises(LorafitError, match=r"one optimizer step is --grad-accum 50 micro-batches of --batch-size 1, "
                                           r"but an epoch of the 2 training examples is 2 micro-batches: one step "
                                           r"would go over the data 25 times, not the 1 epoch asked for"):
        steps_for_epochs(2, 1, 50, 1.0)


def test_the_command_refuses_it_before_the_run_folder_is_made(tmp_path, tiny_chat_model, capsys):
    data = tmp_path / "two.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_chat_model), "--data", str(data), "--held-out", "0", "--epochs", "1",
                 "--batch-size", "1", "--grad-accum", "50", "--output", str(run)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Lower --grad-accum to at most 2, or give --steps" in err[0]
    assert not run.exists()
