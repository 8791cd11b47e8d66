"""The trainable parameters' gradient tensors, allocated once before the first step and reused by every step.

Why: autograd allocates a parameter's gradient when backward first reaches it, that is in the middle of the
first forward call's freed activations, and `zero_grad(set_to_none=True)` frees them all again after the
step. On CPU those small blocks land in the free holes glibc's heap keeps for the next call's activations,
split them, and the heap grows instead of reusing them. Measured with bench/memory_plan.py (peak RSS over
the process before loading, 6 steps of the loop's step on the default model, medians of three processes):
LoRA r=8 on q,v, 2 × 256 tokens, 736 → 710 MiB; r=8 on every linear layer, 4 × 512, 2,058 → 1,920 MiB; with
checkpointing, 2 × 512, 580 → 514 MiB; IA3 (tiny gradients) 648 → 649 MiB (lorafit issue 16).

With a gradient tensor already there, backward adds into it in place (PyTorch's AccumulateGrad does when
grad mode is off, as it is in backward), so no step allocates a gradient. What the optimizer sees is
unchanged: a parameter that no backward reached in a step (an expert no token was routed to) gets None
again before the optimizer steps, exactly as with `zero_grad(set_to_none=True)` alone, so AdamW skips it.
Reached is told by the tensor's version counter, which every in-place write increments.
"""

from __future__ import annotations

import torch


class StepGradients:
    """One gradient tensor per trainable parameter, lent to `.grad` for the length of a step."""

    def __init__(self, parameters: list[torch.Tensor]) -> None:
        self.parameters = list(parameters)
        self.tensors = [torch.zeros_like(p) for p in self.parameters]  # with the parameter's strides, as autograd makes them
        self._versions: list[int] = []

    def lend(self) -> None:
        """Before the step's first backward: every parameter's `.grad` is its own zeroed tensor."""
        torch._foreach_zero_(self.tensors)
        for parameter, gradient in zip(self.parameters, self.tensors):
            parameter.grad = gradient
        self._versions = [gradient._version for gradient in self.tensors]

    def drop_unreached(self) -> None:
        """After the step's backward calls: parameters that no backward reached have no gradient (None)."""
        for parameter, gradient, version in zip(self.parameters, self.tensors, self._versions):
            if parameter.grad is gradient and gradient._version == version:
                parameter.grad = None
