"""The benchmark data: the built-in date task and the variable-length instruction set, both seeded.

Both sides of every comparison take their micro-batches from the same plan
(`lorafit.train.batching.plan_batches`, the loop's own), so they see the same examples in the same order.
"""

from __future__ import annotations

from common import SEED
from varlen import variable_length_examples

BATCH_SIZE = 8
DATE_EXAMPLES = 800  # 100 batches of 8: more than any run here takes
DATE_MAX_LENGTH = 512  # lorafit train's default --max-length
VARLEN_EXAMPLES = 400  # ~365 kept (those over 1024 tokens are dropped): ~45 batches
VARLEN_MAX_LENGTH = 1024


def date_examples(tokenizer) -> list:
    from lorafit.data.tasks import date_task_splits
    from lorafit.data.tokenizing import build_dataset

    conversations, _ = date_task_splits(DATE_EXAMPLES, 0, SEED)
    examples, _ = build_dataset(tokenizer, conversations, DATE_MAX_LENGTH)
    return examples


def varlen_examples(tokenizer) -> list:
    return variable_length_examples(tokenizer, VARLEN_EXAMPLES, SEED, VARLEN_MAX_LENGTH)


DATASETS = {"date": date_examples, "varlen": varlen_examples}


def batch_plan(examples: list, batch_size: int = BATCH_SIZE) -> list[list[int]]:
    """Epoch 0 of the loop's plan (shuffled, length-grouped in windows) for SEED."""
    from lorafit.train.batching import plan_batches

    return plan_batches([len(e.input_ids) for e in examples], batch_size, SEED, 0)


def padded_size(examples: list, indices: list[int]) -> int:
    """Positions a padded batch of these examples runs: rows × the longest row."""
    return len(indices) * max(len(examples[i].input_ids) for i in indices)
