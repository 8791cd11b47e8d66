"""Instruction data: read JSONL/JSON records in the common shapes, turn them into token ids and labels.

Every record is normalised to chat messages first (`read_examples`), so tokenisation has one input
form; labels are the token ids of what the model should learn to say, -100 everywhere else. Nothing a
user wrote is dropped silently: a field the record's shape does not read is named in a note, and an
example left with nothing to train on is dropped and counted in DataStats.
"""

from __future__ import annotations

import json
import random
import sys
import warnings
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

from jinja2 import TemplateError  # chat templates are jinja; transformers needs it for apply_chat_template

from lorafit.errors import LorafitError

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
CHAT_ROLES = ("system", "user", "assistant")
TEXT_ROLE = "text"  # a lone {"role": "text"} message: train on the whole text, no template
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
CHAT_MESSAGE_KEYS = ("role", "content")
SHAREGPT_MESSAGE_KEYS = ("from", "value")
ALPACA_KEYS = ("instruction", "input", "output", "system", "history")  # LLaMA-Factory's alpaca columns
ACCEPTED_SHAPES = (
    "'messages' (chat), 'conversations' (ShareGPT), 'instruction'+'output' (alpaca), 'prompt'+'completion', 'text'"
)
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


# --- reading records ------------------------------------------------------------------------------


@dataclass
class LoadedExamples:
    """What read_examples made of a data file: the conversations, and one note per field it did not use.

    The notes exist so that nothing a user wrote disappears unmentioned: a field lorafit does not read
    (an 'id', a message's 'name', ShareGPT's 'tools') is named once, with how many records hold it.
    """

    conversations: list[list[dict]]
    ignored: list[str]


def read_examples(path: str | Path) -> LoadedExamples:
    """Read a JSONL file (one object per line) or a JSON list of objects as chat conversations.

    Each conversation is a list of {"role", "content"} dicts with roles system/user/assistant, or a
    single {"role": "text"} message for plain-text records. The format is told by content, not by
    the file's extension: a file whose first character is '[' is a JSON list, anything else JSONL.
    Fields that the record's shape does not read are listed in `ignored`, one note per field.
    """
    path = Path(path)
    located_records = _read_records(path)
    conversations = []
    unused_at: dict[str, list] = {}  # field -> [how many records hold it, where the first one is]
    for where, record in located_records:
        turns, unused = _normalise(record, where)
        conversations.append(turns)
        for name in unused:
            unused_at.setdefault(name, [0, where])[0] += 1
    notes = [
        f"{path}: field {name!r} is not used ({count} of {len(located_records)} records; first at {first})"
        for name, (count, first) in unused_at.items()
    ]
    return LoadedExamples(conversations, notes)


def load_examples(path: str | Path) -> list[list[dict]]:
    """The conversations of read_examples(path); each note about an unused field becomes a warning.

    For library callers that want only the conversations: the warnings make sure they still learn
    which of their fields had no effect.
    """
    loaded = read_examples(path)
    for note in loaded.ignored:
        warnings.warn(note, stacklevel=2)
    return loaded.conversations


def _read_records(path: Path) -> list[tuple[str, object]]:
    """The file's parsed records, each with where it is: 'file:line' (JSONL) or 'file[index]' (a list)."""
    text = _read_utf8(path)
    if text.lstrip().startswith("["):
        located_records = _parse_json_list(path, text)
    else:
        located_records = _parse_jsonl(path, text)
    if not located_records:
        raise LorafitError(f"{path}: no records (the file is empty or holds only blank lines)")
    return located_records


def _read_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LorafitError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise LorafitError(f"{path}: is a directory; expected a .jsonl or .json file") from None
    except OSError as err:
        raise LorafitError(f"{path}: cannot read the data file ({err.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise LorafitError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x}); re-save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")  # editors on Windows like to add a byte-order mark


def _parse_jsonl(path: Path, text: str) -> list[tuple[str, object]]:
    records = []
    # split on "\n" only: str.splitlines would also split on U+2028, which JSON allows inside strings
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as err:
            if _is_one_json_object(text):
                raise LorafitError(
                    f"{path}: the file holds a single JSON object; expected one object per line "
                    "(JSONL) or a JSON list of objects"
                ) from None
            raise LorafitError(f"{path}:{number}: malformed JSON: {err.msg} (column {err.colno})") from None
        except (RecursionError, ValueError) as err:
            raise LorafitError(f"{path}:{number}: {_beyond_parser_limits(err)}") from None
    return records


def _is_one_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (RecursionError, ValueError):  # ValueError includes JSONDecodeError
        return False


def _parse_json_list(path: Path, text: str) -> list[tuple[str, object]]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise LorafitError(f"{path}:{err.lineno}: malformed JSON: {err.msg} (column {err.colno})") from None
    except (RecursionError, ValueError) as err:
        raise LorafitError(f"{_locate_refused_record(path, text)}: {_beyond_parser_limits(err)}") from None
    return [(f"{path}[{index}]", record) for index, record in enumerate(records)]


def _beyond_parser_limits(err: Exception) -> str:
    """Why Python's JSON parser refused valid JSON: it recurses once per nesting level and caps integer size."""
    if isinstance(err, RecursionError):
        return "a value is nested too deeply for Python's JSON parser (its recursion limit); flatten it"
    if "integer string conversion" in str(err):
        return (
            f"an integer has more than {sys.get_int_max_str_digits()} digits, the most Python's JSON parser "
            "reads; write it as a string"
        )
    return f"Python's JSON parser refused it: {err}"


def _locate_refused_record(path: Path, text: str) -> str:
    """'file:line: record [i]' for the list element the parser refuses, found by parsing one element at a time.

    The parser reports no position for a RecursionError or an oversized integer, so the elements before
    the refused one are decoded again to find where it starts; just the file when that fails too.
    """
    decoder = json.JSONDecoder()
    position, index = _skip_json_space(text, text.index("[") + 1), 0
    while position < len(text) and text[position] != "]":
        start = position
        try:
            _, position = decoder.raw_decode(text, start)
        except (RecursionError, ValueError):
            return f"{path}:{text.count(chr(10), 0, start) + 1}: record [{index}]"
        position = _skip_json_space(text, position)
        if not text.startswith(",", position):
            break
        position, index = _skip_json_space(text, position + 1), index + 1
    return str(path)


def _skip_json_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\n\r":
        position += 1
    return position


def _normalise(record: object, where: str) -> tuple[list[dict], list[str]]:
    """Map one record of any accepted shape to chat messages, and name the fields that shape does not read.

    `where` is 'file:line' or 'file[index]'. Unused fields come back as 'id' for a record's own keys and
    'messages[].name' for keys inside a list of messages, so a note can count records per field.
    """
    if not isinstance(record, dict):
        raise LorafitError(f"{where}: expected a JSON object, got {_json_type(record)}")
    if "messages" in record:
        turns = _from_chat(record["messages"], where)
        return turns, _unused_fields(record, ("messages",), {"messages": CHAT_MESSAGE_KEYS})
    if "conversations" in record:
        turns = _from_sharegpt(record, where)
        return turns, _unused_fields(record, ("conversations", "system"), {"conversations": SHAREGPT_MESSAGE_KEYS})
    if "instruction" in record and "output" in record:
        return _from_alpaca(record, where), _unused_fields(record, ALPACA_KEYS, {})
    if "prompt" in record and "completion" in record:
        turns = _from_prompt_completion(record, where)
        lists = {key: CHAT_MESSAGE_KEYS for key in ("prompt", "completion") if isinstance(record[key], list)}
        return turns, _unused_fields(record, ("prompt", "completion"), lists)
    if "text" in record:
        turns = [{"role": TEXT_ROLE, "content": _string(record["text"], where, "text")}]
        return turns, _unused_fields(record, ("text",), {})
    raise LorafitError(
        f"{where}: record with keys {sorted(record)} matches no accepted shape; expected {ACCEPTED_SHAPES}"
    )


def _unused_fields(record: dict, used: tuple[str, ...], message_lists: dict[str, tuple[str, ...]]) -> list[str]:
    """The record's keys outside `used`, then 'field[].key' for message keys outside those the shape reads.

    Called after the record was converted, so each field in message_lists is a list of objects.
    """
    unused = [key for key in record if key not in used]
    for list_name, message_keys in message_lists.items():
        inner = (key for message in record[list_name] for key in message if key not in message_keys)
        unused += [f"{list_name}[].{key}" for key in dict.fromkeys(inner)]
    return unused


def _from_chat(messages: object, where: str) -> list[dict]:
    return _check_turn_order(_chat_turns(messages, where, "messages"), where, "messages")


def _chat_turns(messages: object, where: str, field: str) -> list[dict]:
    """Validate a list of {"role", "content"} messages (the OpenAI / TRL form) and copy out those two keys."""
    turns = []
    for index, message in enumerate(_list_of_objects(messages, where, field)):
        item = f"{field}[{index}]"
        if "role" not in message or "content" not in message:
            raise LorafitError(f"{where}: {item} needs 'role' and 'content' keys, has {sorted(message)}")
        role = _string(message["role"], where, f"{item}.role")
        if role not in CHAT_ROLES:
            raise LorafitError(f"{where}: {item}.role {role!r} is not one of {', '.join(CHAT_ROLES)}")
        turns.append({"role": role, "content": _string(message["content"], where, f"{item}.content")})
    return turns


def _from_sharegpt(record: dict, where: str) -> list[dict]:
    """ShareGPT turns; the record's optional 'system' string becomes a system message before them."""
    turns = []
    for index, message in enumerate(_list_of_objects(record["conversations"], where, "conversations")):
        field = f"conversations[{index}]"
        if "from" not in message or "value" not in message:
            raise LorafitError(f"{where}: {field} needs 'from' and 'value' keys, has {sorted(message)}")
        speaker = _string(message["from"], where, f"{field}.from")
        if speaker not in SHAREGPT_ROLES:
            raise LorafitError(f"{where}: {field}.from {speaker!r} is not one of {', '.join(SHAREGPT_ROLES)}")
        turns.append({"role": SHAREGPT_ROLES[speaker], "content": _string(message["value"], where, f"{field}.value")})
    system = _optional_string(record.get("system"), where, "system")
    if system:
        if any(turn["role"] == "system" for turn in turns):
            # two system prompts would each reach the template; which one the user meant is not ours to pick
            raise LorafitError(
                f"{where}: both 'system' and a system turn in conversations give a system prompt; keep one"
            )
        turns.insert(0, {"role": "system", "content": system})
    return _check_turn_order(turns, where, "conversations")


def _from_alpaca(record: dict, where: str) -> list[dict]:
    """Alpaca (LLaMA-Factory's form): optional system, then history's earlier turns, then instruction+input."""
    instruction = _string(record["instruction"], where, "instruction")
    extra_input = _optional_string(record.get("input"), where, "input")
    system = _optional_string(record.get("system"), where, "system")
    user = instruction + ("\n\n" + extra_input if extra_input else "")
    turns = [{"role": "system", "content": system}] if system else []
    return turns + _alpaca_history(record.get("history"), where) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _string(record["output"], where, "output")},
    ]


def _alpaca_history(history: object, where: str) -> list[dict]:
    """Alpaca 'history': [instruction, response] pairs, oldest first, that precede the record's instruction."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise LorafitError(
            f"{where}: history must be a list of [instruction, response] pairs, got {_json_type(history)}"
        )
    turns = []
    for index, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2):
            shape = f"a list of {len(pair)}" if isinstance(pair, list) and pair else _json_type(pair)
            raise LorafitError(f"{where}: history[{index}] must be an [instruction, response] pair, got {shape}")
        turns.append({"role": "user", "content": _string(pair[0], where, f"history[{index}][0]")})
        turns.append({"role": "assistant", "content": _string(pair[1], where, f"history[{index}][1]")})
    return turns


def _from_prompt_completion(record: dict, where: str) -> list[dict]:
    """Prompt/completion, each a string or (TRL's conversational form) a list of {"role", "content"} messages.

    The completion is what the model learns to say, so its messages must all be assistant turns. The
    prompt may not hold assistant turns: lorafit trains every assistant turn, while this form promises
    a loss on the completion only, so such data is pointed to 'messages', which says what it does.
    """
    prompt_turns = _side_turns(record["prompt"], where, "prompt", string_role="user")
    completion_turns = _side_turns(record["completion"], where, "completion", string_role="assistant")
    for index, turn in enumerate(prompt_turns):
        if turn["role"] == "assistant":
            raise LorafitError(
                f"{where}: prompt[{index}] is an assistant turn, which lorafit would train on (it trains every "
                "assistant turn, not only the completion); give the whole conversation as 'messages' instead"
            )
    for index, turn in enumerate(completion_turns):
        if turn["role"] != "assistant":
            raise LorafitError(f"{where}: completion[{index}].role must be 'assistant', got {turn['role']!r}")
    if not any(turn["role"] == "user" for turn in prompt_turns):
        raise LorafitError(f"{where}: prompt has no user turn for the completion to answer")
    return prompt_turns + completion_turns


def _side_turns(value: object, where: str, field: str, string_role: str) -> list[dict]:
    """One side of a prompt/completion record as turns: a string is one turn in string_role."""
    if isinstance(value, list):
        return _chat_turns(value, where, field)
    if not isinstance(value, str):
        raise LorafitError(f"{where}: {field} must be a string or a list of messages, got {_json_type(value)}")
    return [{"role": string_role, "content": value}]


def _check_turn_order(turns: list[dict], where: str, field: str) -> list[dict]:
    """A conversation needs an assistant turn to train on, and a user turn before it to answer."""
    roles = [turn["role"] for turn in turns]
    if "assistant" not in roles:
        raise LorafitError(f"{where}: {field} has no assistant turn, so there is nothing to train on")
    if "user" not in roles[: roles.index("assistant")]:
        raise LorafitError(f"{where}: {field} has an assistant turn before any user turn")
    return turns


def _list_of_objects(value: object, where: str, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise LorafitError(f"{where}: {field} must be a non-empty list of objects, got {_json_type(value)}")
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise LorafitError(f"{where}: {field}[{index}] must be an object, got {_json_type(item)}")
    return value


def _string(value: object, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise LorafitError(f"{where}: {field} must be a string, got {_json_type(value)}")
    return value


def _optional_string(value: object, where: str, field: str) -> str:
    return "" if value is None else _string(value, where, field)


def _json_type(value: object) -> str:
    """Name a parsed JSON value's type the way the user's file spells it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "an empty list" if not value else "a list"
    return {str: "a string", dict: "an object"}.get(type(value), type(value).__name__)


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


def split_examples(items: list, held_out: float | int, seed: int) -> tuple[list, list]:
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


def _held_out_count(held_out: float | int, total: int) -> int:
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)):
        raise LorafitError(f"held-out must be a fraction or a count, got {held_out!r}")
    if isinstance(held_out, float):
        if not 0 <= held_out < 1:
            raise LorafitError(f"held-out fraction must be in [0, 1), got {held_out}")
        return max(1, round(total * held_out)) if held_out > 0 else 0
    if held_out < 0:
        raise LorafitError(f"held-out count must not be negative, got {held_out}")
    return held_out
