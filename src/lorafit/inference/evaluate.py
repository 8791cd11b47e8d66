"""Held-out evaluation: token loss and perplexity, and exact match of greedy generations.

Both measure the same examples: those that fit max_length whole. A held-out example cut short would
score a different task (its reply truncated), so it is left out of both and counted instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorafit.data.tasks import evaluation_pairs, exact_match
from lorafit.data.tokenizing import DataStats
from lorafit.inference.generation import generate_replies
from lorafit.train.batching import collate_padded
from lorafit.train.loss import summed_token_loss
from lorafit.train.output_head import check_output_head


@dataclass
class HeldOut:
    """Held-out examples tokenised for the loss, the same conversations for exact match, and what was left out.

    At most `count` examples are scored (--eval-examples): the first that fit max_length whole, so a big
    held-out file costs its preparation (cached), never minutes of scoring before the first step.
    """

    examples: list
    conversations: list
    stats: DataStats

    @property
    def left_out(self) -> int:
        return self.stats.examples_in - self.stats.kept

    def describe_left_out(self, max_length: int) -> str:
        return (f"{self.left_out} of {self.stats.examples_in} held-out examples left out of loss and exact match "
                f"({self.stats.skipped_too_long} longer than --max-length {max_length}, "
                f"{self.stats.dropped_all_masked} with nothing to predict)")

    def describe_scored(self, matchable: int, max_new_tokens: int) -> str:
        """What is scored: the loss on the examples, exact match on those whose reply can be generated whole."""
        capped = f" (the first of {self.stats.kept} that fit; --eval-examples)" if len(self.examples) < self.stats.kept \
            else ""
        if not max_new_tokens:
            match = "no exact match (--max-new-tokens 0)"
        elif matchable == len(self.examples):
            match = "exact match on the same"
        else:
            match = (f"exact match on {matchable} of them (the other {len(self.examples) - matchable} have no reply, or "
                     f"one longer than --max-new-tokens {max_new_tokens} tokens, which could never match)")
        return f"loss on {len(self.examples)} examples{capped}; {match}"


def held_out_from(prepared, records, count: int, source: str | None = None) -> HeldOut:
    """The first `count` of `records` (of a PreparedData) that fit its max_length whole, for loss and exact match."""
    examples, stats = prepared.select(records, "skip", purpose="held-out", source=source or "")
    scored = examples.first(count)
    return HeldOut(scored, scored.conversations(), stats)


@torch.no_grad()
def evaluate_loss(model, examples: list, pad_id: int, batch_size: int = 8) -> dict:
    """Mean cross-entropy over the label tokens of `examples`, and its perplexity."""
    device = next(model.parameters()).device
    check_output_head(model)  # a family whose logits lorafit cannot reproduce is scored by its own forward
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    # batches of similar lengths pad little: the sum over examples is the same in any order
    examples = sorted(examples, key=lambda example: len(example.input_ids))
    for start in range(0, len(examples), batch_size):
        batch = collate_padded(examples[start : start + batch_size], pad_id).to(device)
        total += summed_token_loss(model, batch).item()
        count += batch.label_tokens
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def matchable(tokenizer, conversations: list[list[dict]], max_new_tokens: int) -> list[list[dict]]:
    """The conversations exact match can score: ending in a reply of at most max_new_tokens tokens. A longer reply
    is cut by generation and could never match; counting it a miss would measure the length limit, not the model."""
    if not max_new_tokens:
        return []
    replies = [c for c in conversations if c and c[-1]["role"] == "assistant"]
    if not replies:
        return []
    lengths = tokenizer([c[-1]["content"] for c in replies], add_special_tokens=False)["input_ids"]
    return [c for c, ids in zip(replies, lengths) if len(ids) <= max_new_tokens]


def exact_match_accuracy(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 32) -> dict:
    """Share of chat conversations whose final assistant reply the model reproduces exactly.

    Plain-text records have no reply to compare against and are left out.
    """
    pairs = evaluation_pairs([c for c in conversations if c and c[-1]["role"] == "assistant"])
    if not pairs:
        return {}
    replies = generate_replies(model, tokenizer, [prompt for prompt, _ in pairs], max_new_tokens)
    hits = sum(exact_match(reply, reference) for reply, (_, reference) in zip(replies, pairs))
    return {"exact_match": hits / len(pairs)}
