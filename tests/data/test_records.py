"""Tests for lorafit.data.records: every field is used or reported, the optional fields of each shape,
and values Python's JSON parser refuses (nesting depth, integer size) as file:line errors."""

import json
import sys
import warnings

import pytest

from lorafit.data.records import LoadedExamples, load_examples, read_examples
from lorafit.errors import LorafitError

Q = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}
ALPACA_QA = {"instruction": "q", "output": "a"}


def jsonl(tmp_path, *records, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write(tmp_path, text, name="data.jsonl"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def read_error(path) -> str:
    with pytest.raises(LorafitError) as caught:
        read_examples(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


def record_error(tmp_path, record) -> str:
    """The error for `record` as line 2 of a file, with the 'file:2: ' it must start with removed."""
    path = jsonl(tmp_path, {"text": "fine"}, record)
    message = read_error(path)
    assert message.startswith(f"{path}:2: "), message
    return message.removeprefix(f"{path}:2: ")


# --- unused fields are reported, once per field ----------------------------------------------------


def test_unused_record_and_message_fields_are_each_reported_once_with_counts(tmp_path):
    path = jsonl(
        tmp_path,
        {"id": 1, "messages": [Q, A]},
        {"id": 2, "source": "web", "messages": [{**Q, "name": "ann"}, {**A, "weight": 0}]},
        {"id": 3, "messages": [{**Q, "name": "bob"}, {**A, "name": "bot"}]},
    )
    loaded = read_examples(path)
    assert isinstance(loaded, LoadedExamples)
    assert loaded.conversations == [[Q, A]] * 3
    assert loaded.ignored == [
        f"{path}: field 'id' is not used (3 of 3 records; first at {path}:1)",
        f"{path}: field 'source' is not used (1 of 3 records; first at {path}:2)",
        f"{path}: field 'messages[].name' is not used (2 of 3 records; first at {path}:2)",
        f"{path}: field 'messages[].weight' is not used (1 of 3 records; first at {path}:2)",
    ]


def test_a_second_shape_in_the_same_record_is_reported(tmp_path):
    path = jsonl(tmp_path, {"messages": [Q, A], "text": "also here"})
    loaded = read_examples(path)
    assert loaded.conversations == [[Q, A]]
    assert loaded.ignored == [f"{path}: field 'text' is not used (1 of 1 records; first at {path}:1)"]


def test_json_list_notes_name_the_record_index(tmp_path):
    path = write(tmp_path, json.dumps([{"text": "a"}, {"text": "b", "meta": {}}]), name="data.json")
    assert read_examples(path).ignored == [f"{path}: field 'meta' is not used (1 of 2 records; first at {path}[1])"]


def test_records_using_every_field_give_no_notes(tmp_path):
    path = jsonl(
        tmp_path,
        {"instruction": "i", "input": "x", "output": "o", "system": "s", "history": [["h", "r"]]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "s"},
        {"prompt": [Q], "completion": [A]},
        {"text": "t"},
    )
    assert read_examples(path).ignored == []


def test_load_examples_warns_each_note_once_at_the_callers_line(tmp_path):
    path = jsonl(tmp_path, {"text": "a", "id": 1}, {"text": "b", "id": 2, "lang": "en"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        conversations = load_examples(path)
    assert conversations == [[{"role": "text", "content": "a"}], [{"role": "text", "content": "b"}]]
    assert [str(w.message) for w in caught] == read_examples(path).ignored
    assert len(caught) == 2 and all(w.category is UserWarning and w.filename == __file__ for w in caught)


# --- alpaca: system, input, history -----------------------------------------------------------------


def test_alpaca_history_becomes_earlier_turns_after_the_system_prompt(tmp_path):
    record = {
        "instruction": "And 3+3?",
        "input": "quickly",
        "output": "6",
        "system": "Be terse.",
        "history": [["1+1?", "2"], ["2+2?", "4"]],
    }
    assert read_examples(jsonl(tmp_path, record)).conversations == [
        [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "2"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?\n\nquickly"},
            {"role": "assistant", "content": "6"},
        ]
    ]


def test_alpaca_empty_or_null_history_adds_nothing(tmp_path):
    path = jsonl(tmp_path, {**ALPACA_QA, "history": []}, {**ALPACA_QA, "history": None})
    assert read_examples(path).conversations == [[Q, A]] * 2


def test_alpaca_history_shape_errors_name_the_line_and_field(tmp_path):
    cases = {
        "history must be a list of [instruction, response] pairs, got a string": "q, a",
        "history[0] must be an [instruction, response] pair, got a list of 3": [["q", "a", "extra"]],
        "history[1] must be an [instruction, response] pair, got an object": [["q", "a"], {"q": "a"}],
        "history[0] must be an [instruction, response] pair, got an empty list": [[]],
        "history[0][1] must be a string, got null": [["q", None]],
    }
    for expected, history in cases.items():
        assert record_error(tmp_path, {"instruction": "i", "output": "o", "history": history}) == expected


def test_alpaca_unknown_fields_are_reported(tmp_path):
    path = jsonl(tmp_path, {"instruction": "i", "output": "o", "category": "math"})
    assert read_examples(path).ignored == [f"{path}: field 'category' is not used (1 of 1 records; first at {path}:1)"]


# --- ShareGPT: system, tools, message keys ----------------------------------------------------------


def test_sharegpt_system_string_becomes_the_first_message_and_tools_are_reported(tmp_path):
    record = {
        "conversations": [{"from": "human", "value": "q", "weight": 1}, {"from": "gpt", "value": "a"}],
        "system": "Be terse.",
        "tools": "[]",
    }
    path = jsonl(tmp_path, record)
    loaded = read_examples(path)
    assert loaded.conversations == [[{"role": "system", "content": "Be terse."}, Q, A]]
    assert loaded.ignored == [
        f"{path}: field 'tools' is not used (1 of 1 records; first at {path}:1)",
        f"{path}: field 'conversations[].weight' is not used (1 of 1 records; first at {path}:1)",
    ]


def test_sharegpt_empty_system_adds_nothing_and_a_wrong_type_or_a_second_system_is_refused(tmp_path):
    turns = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    assert read_examples(jsonl(tmp_path, {"conversations": turns, "system": ""})).conversations == [[Q, A]]
    assert record_error(tmp_path, {"conversations": turns, "system": ["s"]}) == "system must be a string, got a list"
    with_system_turn = {"conversations": [{"from": "system", "value": "S"}, *turns], "system": "T"}
    assert record_error(tmp_path, with_system_turn) == (
        "both 'system' and a system turn in conversations give a system prompt; keep one"
    )


# --- prompt/completion as strings or as TRL's conversational message lists ---------------------------


def test_conversational_prompt_and_completion(tmp_path):
    system = {"role": "system", "content": "s"}
    path = jsonl(
        tmp_path,
        {"prompt": [system, {**Q, "name": "ann"}], "completion": [A]},
        {"prompt": "q", "completion": [A, {"role": "assistant", "content": "more", "tool_calls": []}]},
        {"prompt": [Q], "completion": "a"},
    )
    loaded = read_examples(path)
    assert loaded.conversations == [
        [system, Q, A],
        [Q, A, {"role": "assistant", "content": "more"}],
        [Q, A],
    ]
    assert loaded.ignored == [
        f"{path}: field 'prompt[].name' is not used (1 of 3 records; first at {path}:1)",
        f"{path}: field 'completion[].tool_calls' is not used (1 of 3 records; first at {path}:2)",
    ]


def test_conversational_prompt_and_completion_errors(tmp_path):
    cases = {
        "prompt[0] needs 'role' and 'content' keys, has ['text']": {"prompt": [{"text": "q"}], "completion": [A]},
        "prompt must be a non-empty list of objects, got an empty list": {"prompt": [], "completion": [A]},
        "completion[0].content must be a string, got a number": {"prompt": [Q], "completion": [{**A, "content": 1}]},
        "completion[0].role 'bot' is not one of system, user, assistant": {
            "prompt": [Q],
            "completion": [{**A, "role": "bot"}],
        },
        "completion[1].role must be 'assistant', got 'user'": {"prompt": [Q], "completion": [A, Q]},
        "prompt has no user turn for the completion to answer": {
            "prompt": [{"role": "system", "content": "s"}],
            "completion": "a",
        },
        "prompt must be a string or a list of messages, got an object": {"prompt": {"a": 1}, "completion": "a"},
    }
    for expected, record in cases.items():
        assert record_error(tmp_path, record) == expected
    assert record_error(tmp_path, {"prompt": [Q, A, Q], "completion": [A]}).startswith(
        "prompt[1] is an assistant turn, which lorafit would train on"
    )


# --- values beyond Python's JSON parser's limits -----------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000
HUGE = "1" * 5000
NESTED_TOO_DEEPLY = "a value is nested too deeply for Python's JSON parser (its recursion limit); flatten it"
TOO_MANY_DIGITS = (
    f"an integer has more than {sys.get_int_max_str_digits()} digits, the most Python's JSON parser reads; "
    "write it as a string"
)


def test_deeply_nested_value_in_jsonl_names_the_line(tmp_path):
    path = write(tmp_path, '{"text": "a"}\n\n{"text": "b", "extra": ' + DEEP + "}\n")
    assert read_error(path) == f"{path}:3: {NESTED_TOO_DEEPLY}"


def test_huge_integer_in_jsonl_names_the_line(tmp_path):
    path = write(tmp_path, '{"text": "a"}\n{"text": "b", "id": ' + HUGE + "}\n")
    assert read_error(path) == f"{path}:2: {TOO_MANY_DIGITS}"


def test_deeply_nested_json_list_names_the_line_and_record(tmp_path):
    path = write(tmp_path, "[" * 100_000, name="data.json")
    assert read_error(path) == f"{path}:1: record [0]: {NESTED_TOO_DEEPLY}"
    path = write(tmp_path, '[\n  {"text": "a"},\n  {"text": "b"},\n  {"x": ' + DEEP + "}\n]", name="data.json")
    assert read_error(path) == f"{path}:4: record [2]: {NESTED_TOO_DEEPLY}"


def test_huge_integer_in_json_list_names_the_line_and_record(tmp_path):
    path = write(tmp_path, '[\n  {"text": "a"},\n  {"text": "b", "id": ' + HUGE + "}\n]", name="data.json")
    assert read_error(path) == f"{path}:3: record [1]: {TOO_MANY_DIGITS}"


def test_pretty_printed_deep_object_is_a_malformed_line_not_a_crash(tmp_path):
    # the single-object check re-parses the whole file; a RecursionError there must not escape
    path = write(tmp_path, '{\n  "data": ' + DEEP + "\n}\n")
    assert read_error(path).startswith(f"{path}:1: malformed JSON: ")
