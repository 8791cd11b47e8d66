"""The built-in instruction task: rewrite a date written in one of many styles as ISO 8601.

Small instruct models (SmolLM2-135M-Instruct) mostly get it wrong out of the box, a LoRA learns it in
a couple of hundred steps, and exact match on held-out dates shows the difference in one number.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta

from lorafit.errors import LorafitError

DATE_INSTRUCTION = "Rewrite the date in ISO 8601 (YYYY-MM-DD). Answer with the date only."
FIRST_DATE = date(1900, 1, 1)  # the range holds 1900 (not a leap year) and 2000 (one)
LAST_DATE = date(2099, 12, 31)

# Spelled out rather than taken from calendar.month_name, which follows the process's locale.
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _month(day: date) -> str:
    return MONTHS[day.month - 1]


def _weekday(day: date) -> str:
    return WEEKDAYS[day.weekday()]


# Every style is unambiguous (the month is spelled) and none is ISO-like already: SmolLM2-135M-Instruct
# rewrote year-first numeric dates (2021/3/5) correctly a quarter of the time, the others ~5%.
DATE_STYLES: dict[str, Callable[[date], str]] = {
    "month day, year": lambda d: f"{_month(d)} {d.day}, {d.year}",  # March 5, 2021
    "day month year": lambda d: f"{d.day} {_month(d)} {d.year}",  # 5 March 2021
    "ordinal of month": lambda d: f"{_ordinal(d.day)} of {_month(d)} {d.year}",  # 5th of March 2021
    "month ordinal": lambda d: f"{_month(d)} {_ordinal(d.day)}, {d.year}",  # March 5th, 2021
    "abbreviated month": lambda d: f"{_month(d)[:3]} {d.day} {d.year}",  # Mar 5 2021
    "day-mon-year": lambda d: f"{d.day:02d}-{_month(d)[:3]}-{d.year}",  # 05-Mar-2021
    "day mon, year": lambda d: f"{d.day} {_month(d)[:3]}, {d.year}",  # 5 Mar, 2021
    "weekday, month day, year": lambda d: f"{_weekday(d)}, {_month(d)} {d.day}, {d.year}",  # Friday, March 5, 2021
    "short weekday": lambda d: f"{_weekday(d)[:3]} {d.day} {_month(d)[:3]} {d.year}",  # Fri 5 Mar 2021
}


def date_conversation(day: date, style: str) -> list[dict]:
    """One example: the instruction and the date in `style` from the user, the ISO date as the reply."""
    prompt = f"{DATE_INSTRUCTION}\n{DATE_STYLES[style](day)}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": day.isoformat()}]


def generate_date_task(n: int, seed: int) -> list[list[dict]]:
    """n conversations on n distinct dates between FIRST_DATE and LAST_DATE, each in a random style.

    The same (n, seed) gives the same list; distinct dates mean any split of the list is disjoint.
    """
    days_in_range = (LAST_DATE - FIRST_DATE).days + 1
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= days_in_range:
        raise LorafitError(f"the date task needs a count between 0 and {days_in_range}, got {n!r}")
    rng = random.Random(seed)
    offsets = rng.sample(range(days_in_range), n)
    styles = list(DATE_STYLES)
    return [date_conversation(FIRST_DATE + timedelta(days=offset), rng.choice(styles)) for offset in offsets]


def date_task_splits(n_train: int, n_held_out: int, seed: int) -> tuple[list[list[dict]], list[list[dict]]]:
    """Train and held-out conversations with no date in common (so held-out measures generalisation)."""
    conversations = generate_date_task(n_train + n_held_out, seed)
    return conversations[:n_train], conversations[n_train:]


def evaluation_pairs(conversations: list[list[dict]]) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference reply) per conversation: the prompt is everything before the last reply."""
    pairs = []
    for index, messages in enumerate(conversations):
        if not messages or messages[-1]["role"] != "assistant":
            raise LorafitError(f"evaluation example {index} does not end with an assistant reply to compare against")
        pairs.append((messages[:-1], messages[-1]["content"]))
    return pairs


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the generated reply is the reference, ignoring surrounding whitespace only."""
    return prediction.strip() == reference.strip()


@dataclass
class BuiltinTaskPreset:
    """Settings that make the built-in date task learn on 2 CPU cores in a few minutes (measured)."""

    train_examples: int = 2000
    held_out_examples: int = 100
    steps: int = 100
    lr: float = 2e-3
    warmup_steps: int = 10


BUILTIN = BuiltinTaskPreset()
