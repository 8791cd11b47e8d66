"""A seeded, generated instruction set with lengths from ~16 to ~1024 tokens and long responses.

Nothing can be downloaded here, so the bench makes its own variable-length data: list-expansion
tasks (count, multiplication tables, squares in sentences, numbers spelled out, numbered repetitions;
an echo task for the shortest)
whose response length is set by one parameter. Target lengths are drawn log-uniformly between 16
and 1024 tokens, like real instruction sets (many short examples, a long tail), and the responses
make up most of every long example. The instructions vary in wording, so rows share only the chat
template's first tokens (as in real data).
"""

from __future__ import annotations

import math
import random

ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
WORDS = ("apple", "river", "stone", "cloud", "garden", "pencil", "window", "forest", "candle", "bridge",
         "silver", "harbor", "meadow", "lantern", "violet", "thunder", "marble", "compass", "willow", "ember")


def number_words(n: int) -> str:
    """English words for 0 <= n < 1,000,000 (enough for every task below)."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))
    rest = n % 1000
    return number_words(n // 1000) + " thousand" + ("" if rest == 0 else " " + number_words(rest))


# Each task: (approximate tokens per response item, function(rng, items) -> (instruction, response)).
def _count(rng: random.Random, items: int) -> tuple[str, str]:
    start = rng.randint(1, 500)
    verb = rng.choice(("Count from", "List every whole number from", "Write out the numbers from"))
    return f"{verb} {start} to {start + items - 1}, separated by commas.", ", ".join(
        str(n) for n in range(start, start + items))


def _table(rng: random.Random, items: int) -> tuple[str, str]:
    k = rng.randint(2, 19)
    lead = rng.choice(("Write the multiplication table of", "Give me the times table for", "Multiply"))
    tail = f"by every number from 1 to {items}" if lead == "Multiply" else f"from 1 to {items}"
    return f"{lead} {k} {tail}, one line each.", "\n".join(f"{i} x {k} = {i * k}" for i in range(1, items + 1))


def _squares(rng: random.Random, items: int) -> tuple[str, str]:
    start = rng.randint(1, 60)
    return (f"For each number from {start} to {start + items - 1}, say what its square is, in a full sentence.",
            "\n".join(f"The square of {n} is {n * n}." for n in range(start, start + items)))


def _spelled(rng: random.Random, items: int) -> tuple[str, str]:
    start = rng.randint(0, 900)
    return (f"Spell out in words the {items} numbers starting at {start}, one per line.",
            "\n".join(number_words(n) for n in range(start, start + items)))


def _words(rng: random.Random, items: int) -> tuple[str, str]:
    chosen = rng.sample(WORDS, 4)
    pattern = " ".join(chosen)
    return (f"Repeat the words '{pattern}' in a numbered list of {items} lines.",
            "\n".join(f"{i}. {pattern}" for i in range(1, items + 1)))


def _echo(rng: random.Random, items: int) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"Echo: {word}", word


TASKS = ((2.2, _count), (8.0, _table), (10.0, _squares), (4.5, _spelled), (7.0, _words))
PROMPT_OVERHEAD = 32  # template tokens + an instruction, roughly
SHORT = 40  # targets below this get the echo task (~20 tokens): a list task cannot be that short
SYSTEM = ""  # an empty system turn: the model's default system prompt would make every example >= 40 tokens


def variable_length_conversations(n: int, seed: int, shortest: int = 16, longest: int = 1024) -> list[list[dict]]:
    """n chat conversations whose token lengths spread log-uniformly over [shortest, longest]."""
    rng = random.Random(seed)
    conversations = []
    for _ in range(n):
        target = math.exp(rng.uniform(math.log(shortest), math.log(longest)))
        tokens_per_item, task = (1.0, _echo) if target < SHORT else rng.choice(TASKS)
        items = max(1, round((target - PROMPT_OVERHEAD) / tokens_per_item))
        instruction, response = task(rng, items)
        conversations.append([{"role": "system", "content": SYSTEM}, {"role": "user", "content": instruction},
                              {"role": "assistant", "content": response}])
    return conversations


def variable_length_examples(tokenizer, n: int, seed: int, max_length: int = 1024) -> list:
    """Tokenised examples (lorafit's TokenizedExample); those over max_length are dropped, not cut."""
    from lorafit.data.tokenizing import build_dataset

    examples, _ = build_dataset(tokenizer, variable_length_conversations(n, seed, longest=max_length),
                                max_length, overflow="skip")
    return examples
