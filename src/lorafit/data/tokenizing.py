"""Instruction data as training sequences: chat conversations to token ids and labels, the dataset, splits.

Conversations come from lorafit.data.records, already normalised to chat messages. Labels are the token ids
of what the model should learn to say, IGNORE_INDEX everywhere else; an example left with nothing to
train on is dropped and counted in DataStats.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import groupby

import numpy as np

from lorafit.data.encoding import (
    CUT,
    CUT_TO_NOTHING,
    NOTHING_TRAINED,
    PLAIN_TEMPLATE,
    ConversationEncoder,
    EncodedRecord,
    tokenizer_adds_bos,
)
from lorafit.errors import LorafitError

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
OVERFLOW_CHOICES = ("truncate", "skip")
DROPPED_TOO_LONG = "longer than max_length"
DROPPED_ALL_MASKED = "no trained tokens"
MOSTLY_MASKED_FRACTION = 0.9
ENCODE_BATCH = 2048  # conversations per tokenizer call: large enough to spread over the cores, small in memory

# --- tokenising -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedExample:
    """One training sequence. labels[i] is input_ids[i] where the model is trained, IGNORE_INDEX elsewhere.

    Labels are not shifted: like Hugging Face models, the loss compares logits at i with labels at i+1,
    so labels[0] is never a target. `dropped` says why build_dataset leaves the example out (None when
    it is kept).
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    dropped: str | None = None

    @property
    def trained_token_count(self) -> int:
        """How many tokens the loss is computed on: labels from position 1, as labels[0] has no logit before it."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def tokenize_conversation(
    tokenizer, messages: list[dict], max_length: int, train_on_prompt: bool = False, overflow: str = "truncate"
) -> TokenizedExample:
    """Tokenise one normalised conversation with the tokenizer's chat template (or PLAIN_TEMPLATE).

    Labels cover every assistant turn, including the template's end-of-turn tokens, so the model
    learns to stop; the prompt is masked unless train_on_prompt. The sequence ends with EOS. Longer
    than max_length: overflow="truncate" keeps the start, "skip" marks the example dropped. Many
    conversations at once: ConversationEncoder (data/encoding.py), which this calls with one.
    """
    _check_length_options(max_length, overflow)
    [record] = ConversationEncoder(tokenizer, max_length, train_on_prompt).encode([messages], [""])
    return as_example(record, overflow)


def as_example(record: EncodedRecord, overflow: str) -> TokenizedExample:
    """The training example an encoded record gives under `overflow`, or why it is dropped."""
    ids = record.ids.tolist()
    labels = np.where(record.trained, record.ids, IGNORE_INDEX).tolist()
    cut = record.outcome in (CUT, CUT_TO_NOTHING)
    if cut and overflow == "skip":
        return TokenizedExample(ids, labels, dropped=DROPPED_TOO_LONG)  # skipped, so not cut: ids up to max_length
    if record.outcome in (NOTHING_TRAINED, CUT_TO_NOTHING):
        return TokenizedExample(ids, labels, truncated=cut, dropped=DROPPED_ALL_MASKED)
    return TokenizedExample(ids, labels, truncated=cut)


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat prompt ready for generation: the template with the assistant's opening.

    The same rendering as training (the tokenizer's template or PLAIN_TEMPLATE, BOS placed the same
    way), so a generated reply continues exactly where a trained reply starts.
    """
    has_template = bool(tokenizer.chat_template)
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, chat_template=None if has_template else PLAIN_TEMPLATE
    )
    return _encode(tokenizer, text, add_bos=not has_template and tokenizer_adds_bos(tokenizer))


def _encode(tokenizer, text: str, add_bos: bool) -> list[int]:
    """Token ids of text, without the tokenizer's automatic special tokens; BOS only if asked and absent."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if add_bos and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def _check_length_options(max_length: int, overflow: str) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise LorafitError(f"max_length must be an integer of at least 2, got {max_length!r}")
    if overflow not in OVERFLOW_CHOICES:
        raise LorafitError(f"overflow must be one of {', '.join(OVERFLOW_CHOICES)}, got {overflow!r}")


# --- the dataset ----------------------------------------------------------------------------------


@dataclass
class DataStats:
    """What build_dataset kept and dropped, and how much of what it kept is trained."""

    examples_in: int = 0
    kept: int = 0
    truncated: int = 0  # kept, but cut to max_length
    skipped_too_long: int = 0
    dropped_all_masked: int = 0
    total_tokens: int = 0
    label_tokens: int = 0  # the loss's targets: trained labels from position 1 of each kept example
    # index into build_dataset's conversations of each kept example, in order: lets a caller evaluate
    # (say, exact match) on exactly the conversations whose loss it computes
    kept_indices: list[int] = field(default_factory=list)

    @property
    def masked_fraction(self) -> float:
        """Masked share of the positions that have a target: each example's first token has none."""
        positions = self.total_tokens - self.kept
        return 1 - self.label_tokens / positions if positions > 0 else 0.0

    def summary(self) -> str:
        return (
            f"kept {self.kept} of {self.examples_in} examples ({self.truncated} truncated, "
            f"{self.skipped_too_long} skipped as too long, {self.dropped_all_masked} with no trained tokens); "
            f"{self.total_tokens} tokens, {self.label_tokens} trained"
        )

    def warnings(self) -> list[str]:
        messages = []
        if self.masked_fraction > MOSTLY_MASKED_FRACTION:
            messages.append(
                f"{self.masked_fraction:.0%} of tokens are masked prompt: each step learns from few tokens; "
                "consider shorter prompts or train_on_prompt"
            )
        if self.truncated:
            messages.append(f"{self.truncated} examples were cut to max_length; their responses may be incomplete")
        return messages


def build_dataset(
    tokenizer,
    conversations: list[list[dict]],
    max_length: int,
    train_on_prompt: bool = False,
    overflow: str = "truncate",
    *,
    source: str | None = None,
    purpose: str = "training",
) -> tuple[list[TokenizedExample], DataStats]:
    """Tokenise every conversation; keep those with trained tokens that fit, and count the rest.

    `source` (such as the data file's name) starts every error message, so a user with a training
    file and an evaluation file knows which one is meant; `purpose` ("training", "held-out") names
    the examples in the message when none are left.
    """
    _check_length_options(max_length, overflow)
    prefix = f"{source}: " if source else ""
    encoder = ConversationEncoder(tokenizer, max_length, train_on_prompt)
    stats = DataStats(examples_in=len(conversations))
    kept = []
    cut_to_nothing = 0  # all-masked because truncation removed the reply, as opposed to nothing to train at all
    for first in range(0, len(conversations), ENCODE_BATCH):
        batch = conversations[first : first + ENCODE_BATCH]
        places = [f"{prefix}example {index}" for index in range(first, first + len(batch))]
        for index, record in enumerate(encoder.encode(batch, places), start=first):
            example = as_example(record, overflow)
            if example.dropped == DROPPED_TOO_LONG:
                stats.skipped_too_long += 1
            elif example.dropped == DROPPED_ALL_MASKED:
                stats.dropped_all_masked += 1
                cut_to_nothing += example.truncated
            else:
                kept.append(example)
                stats.kept += 1
                stats.kept_indices.append(index)
                stats.truncated += example.truncated
                stats.total_tokens += len(example.input_ids)
                stats.label_tokens += example.trained_token_count
    if not kept:
        why = _why_none_left(stats, max_length, cut_to_nothing, overflow_applies=purpose == "training")
        raise LorafitError(f"{prefix}no {purpose} examples left: {why}")
    return kept, stats


def _why_none_left(stats: DataStats, max_length: int, cut_to_nothing: int, overflow_applies: bool = True) -> str:
    """Each reason with the fix, as CLI flag and as keyword, since users meet this through either.

    Held-out examples are never truncated, so for them the fix is a larger max_length only.
    """
    if not stats.examples_in:
        return "the data holds no examples"
    reasons = []
    if stats.skipped_too_long:
        reasons.append(
            f"{stats.skipped_too_long} longer than max_length={max_length} were skipped "
            + ("(raise --max-length (max_length) or pass --overflow truncate)" if overflow_applies
               else "(held-out examples are evaluated whole: raise --max-length (max_length))")
        )
    if cut_to_nothing:
        reasons.append(
            f"{cut_to_nothing} had no trained tokens within max_length={max_length} (raise --max-length (max_length))"
        )
    empty = stats.dropped_all_masked - cut_to_nothing
    if empty:
        reasons.append(f"{empty} had no tokens to train on at any length (such as an empty 'text')")
    return f"of {stats.examples_in} examples, " + "; ".join(reasons)


def render_example(tokenizer, example: TokenizedExample) -> str:
    """Decoded text of one example in sections headed 'masked' or 'trained', to check what is learnt."""
    text = "(truncated to max_length)\n" if example.truncated else ""
    pairs = zip(example.input_ids, example.labels, strict=True)
    for trained, run in groupby(pairs, key=lambda pair: pair[1] != IGNORE_INDEX):
        ids = [token_id for token_id, _ in run]
        if text and not text.endswith("\n"):
            text += "\n"
        text += f"--- {'trained' if trained else 'masked'} ({len(ids)} tokens) ---\n"
        text += tokenizer.decode(ids, skip_special_tokens=False)
    return text


def split_examples(items: list, held_out: float, seed: int) -> tuple[list, list]:
    """Split items into (train, held_out) by a seeded shuffle; both keep the items' original order.

    held_out is a fraction in [0, 1) or a count; a non-zero fraction holds out at least one item.
    """
    count = _held_out_count(held_out, len(items))
    _check_some_left(count, len(items))
    held_indices = set(held_out_indices(len(items), count, seed))
    train = [item for index, item in enumerate(items) if index not in held_indices]
    held = [item for index, item in enumerate(items) if index in held_indices]
    return train, held


def held_out_indices(total: int, count: int, seed: int) -> list[int]:
    """Which `count` of `total` items are held out: the first of a seeded shuffle (unordered)."""
    order = list(range(total))
    random.Random(seed).shuffle(order)
    return order[:count]


def held_out_count(held_out: float, total: int, cap: int | None = None) -> tuple[int, str]:
    """How many of `total` records to hold out, and the sentence that says so. A fraction holds out at most `cap`
    (a count holds out what it says): 5% of a million records would otherwise keep 50,000 examples from
    training to score a few hundred."""
    wanted = _held_out_count(held_out, total)
    is_count = isinstance(held_out, int) and not isinstance(held_out, bool)
    count = wanted if is_count or cap is None else min(wanted, cap)
    _check_some_left(count, total)
    if is_count:
        return count, f"{count} of {total} examples (--held-out {held_out})"
    if count < wanted:
        return count, (f"{count} of {total} examples ({held_out:g} of them would be {wanted}; a fraction holds out "
                       f"at most {cap}, a count as many as it says)")
    return count, f"{count} of {total} examples ({held_out:g})"


def _check_some_left(count: int, total: int) -> None:
    if count and count >= total:
        raise LorafitError(
            f"holding out {count} of {total} examples leaves none to train on; pass --held-out 0 "
            "(train on all of it, no held-out evaluation) or give --eval-data FILE"
        )


def _held_out_count(held_out: float, total: int) -> int:
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)):
        raise LorafitError(f"held-out must be a fraction or a count, got {held_out!r}")
    if isinstance(held_out, float):
        if not 0 <= held_out < 1:
            raise LorafitError(f"held-out fraction must be in [0, 1), got {held_out}")
        return max(1, round(total * held_out)) if held_out > 0 else 0
    if held_out < 0:
        raise LorafitError(f"held-out count must not be negative, got {held_out}")
    return held_out
