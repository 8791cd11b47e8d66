"""StepGradients: the gradient tensors made once for a run change where gradients live, never what a step computes."""

import torch

import lorafit
from lorafit.train.gradients import StepGradients
from lorafit.train.step import layout_collate, train_step
from tests.conftest import random_examples, tiny_llama


def _run(use_step_gradients: bool, steps: int = 3):
    model = tiny_llama()
    torch.manual_seed(0)
    lorafit.attach(model, lorafit.LoraConfig(r=4, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    # a trainable tensor no forward uses: with set_to_none it never gets a gradient, so AdamW never moves it
    model.unused = torch.nn.Parameter(torch.ones(3))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-2, weight_decay=0.1)
    gradients = StepGradients(parameters) if use_step_gradients else None
    collate = layout_collate(0, 8, packed=True, shared_prefix=False)  # long examples alone: several calls per step
    examples = random_examples(4 * steps, lengths=(6, 14))
    model.train()
    losses, addresses = [], []
    for step in range(steps):
        pieces = collate(examples[4 * step:4 * step + 4])
        assert len(pieces) > 1
        if gradients is not None:
            gradients.lend()
            addresses.append([p.grad.data_ptr() for p in parameters])
            gradients.drop_unreached()  # nothing ran yet: every parameter is unreached again
            assert all(p.grad is None for p in parameters)
        losses.append(train_step(model, pieces, parameters, optimizer, 1.0, gradients=gradients).loss)
    return model, parameters, losses, addresses


def test_the_same_steps_with_gradients_made_once():
    """Bitwise the same losses and weights as autograd's own gradients, in the same tensors every step."""
    _, plain, plain_losses, _ = _run(False)
    _, parameters, losses, addresses = _run(True)
    assert losses == plain_losses
    for mine, theirs in zip(parameters, plain):
        assert torch.equal(mine, theirs)
    assert addresses[0] == addresses[1] == addresses[2]  # no step allocated a gradient
    assert all(p.grad is None for p in parameters)  # after the step, as zero_grad(set_to_none=True) leaves them


def test_a_parameter_no_backward_reached_is_skipped_by_the_optimizer():
    model, _, _, _ = _run(True)
    assert torch.equal(model.unused.detach(), torch.ones(3))  # weight decay would have shrunk it had it a zero grad
