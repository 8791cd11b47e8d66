"""Instruction data as training sequences: chat conversations to token ids and labels, the dataset, splits.

Conversations come from lorafit.data.records, already normalised to chat messages. Labels are the token ids
of what the model should learn to say, IGNORE_INDEX everywhere else; an example left with nothing to
train on is dropped and counted in DataStats.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import groupby

# chat templates are jinja; transformers needs it for apply_chat_template
from jinja2 import TemplateError

from lorafit.data.records import (
    TEXT_ROLE,
    read_examples,  # noqa: F401  re-exported: the train and evaluate commands import it from here
)
from lorafit.errors import LorafitError

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
OVERFLOW_CHOICES = ("truncate", "skip")
DROPPED_TOO_LONG = "longer than max_length"
DROPPED_ALL_MASKED = "no trained tokens"
MOSTLY_MASKED_FRACTION = 0.9

# Used when the tokenizer has no chat template (base models such as GPT-2). Written as a chat template
# so both cases go through the same span-finding code. Each response ends with EOS so the model learns
# to stop; turns after the first are separated by a blank line. Literal text sits in {{ '...' }}
# because transformers renders templates with trim_blocks, which eats a newline after a block tag.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{% if message.role == 'system' %}{{ message.content }}"
    "{% elif message.role == 'user' %}{{ '### Instruction:\\n' + message.content }}"
    "{% else %}{{ '### Response:\\n' + message.content + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\n### Response:\\n' }}{% endif %}"
)


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
    than max_length: overflow="truncate" keeps the start, "skip" marks the example dropped.
    """
    _check_length_options(max_length, overflow)
    eos_id = _eos_id(tokenizer)
    if not messages:
        raise LorafitError("a conversation has no messages")
    if messages[0]["role"] == TEXT_ROLE:
        input_ids = _encode(tokenizer, messages[0]["content"], add_bos=_tokenizer_adds_bos(tokenizer))
        labels = list(input_ids)
    else:
        input_ids, labels = _tokenize_chat(tokenizer, messages, train_on_prompt, eos_id)
    input_ids, labels = _end_with_eos(tokenizer, input_ids, labels, eos_id)
    return _fit_to_length(input_ids, labels, max_length, overflow)


def _tokenize_chat(tokenizer, messages: list[dict], train_on_prompt: bool, eos_id: int) -> tuple[list[int], list[int]]:
    """Find each assistant turn's tokens by rendering the conversation up to it.

    The turn's tokens are those the rendering of messages[:i+1] adds to that of messages[:i] with the
    generation prompt. That only works for a template that renders earlier turns the same however
    many turns follow (prefix-stable); we check that on the text and refuse templates that are not.
    Whitespace a template puts after a turn's EOS (ChatML's newline) is not trained: generation stops
    at EOS and never produces it.
    """
    replies = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if not replies:
        raise LorafitError("a conversation has no assistant turn, so there is nothing to train on")
    # Turns after the last assistant reply would only be masked prompt with nothing to predict after them.
    last_reply = replies[-1]
    messages = messages[: last_reply + 1]
    has_template = bool(tokenizer.chat_template)
    add_bos = not has_template and _tokenizer_adds_bos(tokenizer)  # a real template places BOS itself

    def render(turns: list[dict], add_generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                turns,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                chat_template=None if has_template else PLAIN_TEMPLATE,
            )
        except TemplateError as err:  # e.g. a template's raise_exception("roles must alternate")
            raise LorafitError(f"the chat template rejected the conversation: {err}") from None

    full_text = render(messages, add_generation_prompt=False)
    input_ids = _encode(tokenizer, full_text, add_bos)
    labels = list(input_ids) if train_on_prompt else [IGNORE_INDEX] * len(input_ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = render(messages[:index], add_generation_prompt=True)
        turn_text = render(messages[: index + 1], add_generation_prompt=False)
        if not (full_text.startswith(turn_text) and turn_text.startswith(prompt_text)):
            raise LorafitError(
                f"the chat template is not prefix-stable: its rendering up to assistant turn {index} is not "
                "the start of the longer conversation's rendering, so the trained tokens cannot be located; "
                "use a template that renders earlier turns identically, or plain 'text' records"
            )
        # Compare token ids rather than assume the text boundary is a token boundary: where a tokenizer
        # merges across it, the merged token holds the reply's first characters and is trained.
        start = _shared_prefix_length(_encode(tokenizer, prompt_text, add_bos), input_ids)
        end = _shared_prefix_length(_encode(tokenizer, turn_text, add_bos), input_ids)
        stop = _stop_position(tokenizer, input_ids[start:end], eos_id)
        end = end if stop is None else start + stop
        labels[start:end] = input_ids[start:end]
    return input_ids, labels


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat prompt ready for generation: the template with the assistant's opening.

    The same rendering as training (the tokenizer's template or PLAIN_TEMPLATE, BOS placed the same
    way), so a generated reply continues exactly where a trained reply starts.
    """
    has_template = bool(tokenizer.chat_template)
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, chat_template=None if has_template else PLAIN_TEMPLATE
    )
    return _encode(tokenizer, text, add_bos=not has_template and _tokenizer_adds_bos(tokenizer))


def _end_with_eos(tokenizer, input_ids: list[int], labels: list[int], eos_id: int) -> tuple[list[int], list[int]]:
    """Make the sequence end with a trained EOS, the token generation stops on.

    ChatML-style templates close a turn with EOS and then a newline; nothing after the stop token is
    ever generated, so such trailing whitespace is dropped instead of appending a second EOS.
    """
    stop = _stop_position(tokenizer, input_ids, eos_id)
    if stop is not None and labels[stop - 1] != IGNORE_INDEX:
        return input_ids[:stop], labels[:stop]
    return input_ids + [eos_id], labels + [eos_id]


def _stop_position(tokenizer, ids: list[int], eos_id: int) -> int | None:
    """Index just past the last EOS in ids when only whitespace follows it, else None."""
    if eos_id not in ids:
        return None
    past_eos = len(ids) - ids[::-1].index(eos_id)
    return None if tokenizer.decode(ids[past_eos:]).strip() else past_eos


def _fit_to_length(input_ids: list[int], labels: list[int], max_length: int, overflow: str) -> TokenizedExample:
    truncated = False
    if len(input_ids) > max_length:
        if overflow == "skip":
            return TokenizedExample(input_ids, labels, dropped=DROPPED_TOO_LONG)
        input_ids, labels, truncated = input_ids[:max_length], labels[:max_length], True
    # labels[0] cannot be predicted: a lone trained first token (an empty text's EOS) gives the loss nothing
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return TokenizedExample(input_ids, labels, truncated, dropped=DROPPED_ALL_MASKED)
    return TokenizedExample(input_ids, labels, truncated)


def _encode(tokenizer, text: str, add_bos: bool) -> list[int]:
    """Token ids of text, without the tokenizer's automatic special tokens; BOS only if asked and absent."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if add_bos and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def _tokenizer_adds_bos(tokenizer) -> bool:
    """Whether plain tokenizer(text) starts with BOS; text without a template should look the same."""
    if tokenizer.bos_token_id is None:
        return False
    probe = tokenizer("a")["input_ids"]
    return (
        probe[:1] == [tokenizer.bos_token_id] and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != probe[:1]
    )


def _shared_prefix_length(first: list[int], second: list[int]) -> int:
    length = 0
    for a, b in zip(first, second, strict=False):  # lengths differ
        if a != b:
            break
        length += 1
    return length


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise LorafitError(
            "the tokenizer has no EOS token, so the model could not learn to stop; set tokenizer.eos_token"
        )
    return tokenizer.eos_token_id


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
    stats = DataStats(examples_in=len(conversations))
    kept = []
    cut_to_nothing = 0  # all-masked because truncation removed the reply, as opposed to nothing to train at all
    for index, messages in enumerate(conversations):
        try:
            example = tokenize_conversation(tokenizer, messages, max_length, train_on_prompt, overflow)
        except LorafitError as err:
            raise LorafitError(f"{prefix}example {index}: {err}") from None
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
    if count and count >= len(items):
        raise LorafitError(
            f"holding out {count} of {len(items)} examples leaves none to train on; pass --held-out 0 "
            "(train on all of it, no held-out evaluation) or give --eval-data FILE"
        )
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held_indices = set(order[:count])
    train = [item for index, item in enumerate(items) if index not in held_indices]
    held = [item for index, item in enumerate(items) if index in held_indices]
    return train, held


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
