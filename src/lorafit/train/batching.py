"""Batches without wasted work: no padding, and a prompt prefix the rows share computed once.

Layouts, all exact (the same loss and gradients as running the examples one by one):
- packed: the examples are concatenated into as few rows as fit `row_tokens`, with position ids
  restarting at 0 for every example. transformers turns restarting position ids (and no attention
  mask) into a block-diagonal causal mask, so packed examples never see each other.
- long examples apart: an example of at least `row_tokens` tokens runs as its own forward call with
  no mask at all. Attention then takes the causal kernel, which skips the masked upper triangle
  (a block-diagonal mask cannot: a packed row of W tokens costs W² however it is split), and the
  call's activations are freed by its backward before the next piece runs, so peak memory follows
  the largest piece, not the whole micro-batch. `collate_pieces` makes that split.
- shared prefix: when the rows start with the same tokens (a chat template's system prompt, a
  task's fixed instruction), their hidden states there are identical under causal attention. The
  prefix runs once (batch 1, with gradients), its key/value cache is repeated across the batch, and
  only the suffixes run per row; backward sums every row's gradient into the one prefix.
`lorafit.train.forward` runs each layout through the model body and checks, once per model, that
packing and prefix sharing are exact for it; the padded layout is the fallback. Targets are shifted
here (target[t] = label[t + 1]) so that no prediction crosses an example boundary.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from lorafit.data.tokenizing import IGNORE_INDEX


@dataclass
class Batch:
    """Model inputs plus next-token targets (IGNORE_INDEX where there is nothing to predict)."""

    inputs: dict
    targets: torch.Tensor
    real_tokens: int  # non-padding tokens: the throughput that counts
    label_tokens: int
    label_positions: torch.Tensor | None = None  # flat indices of the targets that are not IGNORE_INDEX

    def __post_init__(self) -> None:
        if self.label_positions is None:
            self.label_positions = (self.targets.flatten() != IGNORE_INDEX).nonzero().squeeze(1)

    def to(self, device) -> Batch:
        inputs = {k: v.to(device) for k, v in self.inputs.items()}
        return Batch(inputs, self.targets.to(device), self.real_tokens, self.label_tokens,
                     self.label_positions.to(device))


def _shifted_targets(labels: list[int]) -> list[int]:
    return labels[1:] + [IGNORE_INDEX]


def plan_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices per micro-batch for one epoch: shuffled, then grouped by length in windows.

    Sorting within windows of 50 batches keeps similar lengths together (little padding) while the
    batch order stays random; the plan depends only on (seed, epoch), which is what makes resume exact.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    grouped = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        grouped.extend(chunk)
    batches = [grouped[i : i + batch_size] for i in range(0, len(grouped), batch_size)]
    rng.shuffle(batches)
    return batches


def collate_packed(examples: list, pad_id: int, row_tokens: int) -> Batch:
    """Pack examples (first fit, longest first) into rows of at most max(row_tokens, longest) tokens."""
    capacity = max(row_tokens, max(len(e.input_ids) for e in examples))
    rows: list[list] = []
    for example in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        for row in rows:
            if sum(len(e.input_ids) for e in row) + len(example.input_ids) <= capacity:
                row.append(example)
                break
        else:
            rows.append([example])
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    input_ids, positions, targets = [], [], []
    for row in rows:
        ids, pos, tgt = [], [], []
        for example in row:
            ids += example.input_ids
            pos += list(range(len(example.input_ids)))
            tgt += _shifted_targets(example.labels)
        pad = width - len(ids)
        # Padding is one more "example" with its own positions: it attends only to itself.
        input_ids.append(ids + [pad_id] * pad)
        positions.append(pos + list(range(pad)))
        targets.append(tgt + [IGNORE_INDEX] * pad)
    targets_tensor = torch.tensor(targets)
    return Batch(
        inputs={"input_ids": torch.tensor(input_ids), "position_ids": torch.tensor(positions)},
        targets=targets_tensor,
        real_tokens=sum(len(e.input_ids) for e in examples),
        label_tokens=int((targets_tensor != IGNORE_INDEX).sum()),
    )


def collate_alone(example) -> Batch:
    """One example as a batch of one, without padding or mask (the causal attention kernel)."""
    targets = torch.tensor([_shifted_targets(example.labels)])
    return Batch(
        inputs={"input_ids": torch.tensor([example.input_ids])},
        targets=targets,
        real_tokens=len(example.input_ids),
        label_tokens=int((targets != IGNORE_INDEX).sum()),
    )


def collate_pieces(examples: list, pad_id: int, row_tokens: int, packed: bool) -> list[Batch]:
    """A micro-batch as forward calls: each long example alone, the short ones packed (or padded) together.

    "Long" is at least `row_tokens` tokens. Each piece is forwarded and backpropagated on its own
    (the loop sums their gradients), so this is still one micro-batch of the plan.
    """
    long = [e for e in examples if len(e.input_ids) >= row_tokens]
    short = [e for e in examples if len(e.input_ids) < row_tokens]
    pieces = [collate_alone(e) for e in sorted(long, key=lambda e: len(e.input_ids), reverse=True)]
    if short:
        pieces.append(collate_packed(short, pad_id, row_tokens) if packed else collate_padded(short, pad_id))
    return pieces


# A shared prefix shorter than this saves too little to pay for the extra forward call.
MIN_SHARED_PREFIX = 16


def shared_prefix_length(examples: list) -> int:
    """Tokens every example starts with, up to (not including) the first position with a target."""
    first = examples[0].input_ids
    length = min(len(e.input_ids) for e in examples) - 1
    for example in examples[1:]:
        ids = example.input_ids
        common = 0
        while common < length and ids[common] == first[common]:
            common += 1
        length = common
    for example in examples:  # the prefix's own predictions must all be unlabelled
        labelled = [t for t, label in enumerate(example.labels) if label != IGNORE_INDEX]
        if labelled:
            length = min(length, labelled[0] - 1)
    return max(length, 0)


def collate_shared_prefix(examples: list, pad_id: int, prefix_length: int) -> Batch:
    """The common prefix once (1 × P) and the suffixes right-padded (B × S), with positions after P."""
    suffixes = [e.input_ids[prefix_length:] for e in examples]
    width = max(len(s) for s in suffixes)
    input_ids, mask, positions, targets = [], [], [], []
    for example, suffix in zip(examples, suffixes):
        pad = width - len(suffix)
        input_ids.append(suffix + [pad_id] * pad)
        mask.append([1] * (prefix_length + len(suffix)) + [0] * pad)
        positions.append(list(range(prefix_length, prefix_length + width)))
        targets.append(_shifted_targets(example.labels)[prefix_length:] + [IGNORE_INDEX] * pad)
    targets_tensor = torch.tensor(targets)
    return Batch(
        inputs={"prefix_ids": torch.tensor([examples[0].input_ids[:prefix_length]]),
                "input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(mask),
                "position_ids": torch.tensor(positions)},
        targets=targets_tensor,
        real_tokens=sum(len(e.input_ids) for e in examples),
        label_tokens=int((targets_tensor != IGNORE_INDEX).sum()),
    )


def collate_padded(examples: list, pad_id: int) -> Batch:
    """One example per row, right-padded to the longest, with an attention mask."""
    width = max(len(e.input_ids) for e in examples)
    input_ids, mask, targets = [], [], []
    for example in examples:
        pad = width - len(example.input_ids)
        input_ids.append(example.input_ids + [pad_id] * pad)
        mask.append([1] * len(example.input_ids) + [0] * pad)
        targets.append(_shifted_targets(example.labels) + [IGNORE_INDEX] * pad)
    targets_tensor = torch.tensor(targets)
    return Batch(
        inputs={"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(mask)},
        targets=targets_tensor,
        real_tokens=sum(len(e.input_ids) for e in examples),
        label_tokens=int((targets_tensor != IGNORE_INDEX).sum()),
    )
