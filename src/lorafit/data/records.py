"""Reading instruction data: records of every accepted shape, from any DataSource, as chat conversations.

The shapes are chat 'messages', ShareGPT 'conversations', alpaca 'instruction'+'output', 'prompt'+
'completion' and plain 'text'; each record becomes a list of {"role", "content"} messages, so
tokenising has one input form. Files, folders and their formats are sources.py's; the data's own column
names are mapped by columns.py; this module alone knows the shapes. Every error names its place
('file:line', 'file[index]', 'file[row i]'). Nothing a user wrote is dropped silently: a field the
record's shape does not read is named in a note.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from lorafit.data.columns import CHAT_MESSAGE_KEYS, SHAREGPT_MESSAGE_KEYS, ColumnMap
from lorafit.data.sources import DataSource, open_source
from lorafit.errors import LorafitError

CHAT_ROLES = ("system", "user", "assistant")
TEXT_ROLE = "text"  # a lone {"role": "text"} message: train on the whole text, no template
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
ALPACA_KEYS = ("instruction", "input", "output", "system", "history")  # LLaMA-Factory's alpaca columns
ACCEPTED_SHAPES = (
    "'messages' (chat), 'conversations' (ShareGPT), 'instruction'+'output' (alpaca), 'prompt'+'completion', 'text'"
)
Columns = ColumnMap | Mapping | list | tuple | str | None  # what ColumnMap.parse accepts


@dataclass
class LoadedExamples:
    """What read_examples made of a data source: the conversations, and one note per field it did not use.

    The notes exist so that nothing a user wrote disappears unmentioned: a field lorafit does not read
    (an 'id', a message's 'name', ShareGPT's 'tools') is named once, with how many records hold it.
    """

    conversations: list[list[dict]]
    ignored: list[str]
    source: DataSource | None = None


class ConversationStream:
    """A DataSource's records as conversations, a batch at a time; the notes on unused fields at the end.

    Streaming keeps memory flat however large the data is. The notes count every record, so they are
    known once batches() has been read to its end; `count` is the number of records read so far.
    """

    def __init__(self, source: DataSource, columns: Columns = None):
        self.source = source
        self.columns = ColumnMap.parse(columns)
        self.count = 0
        self._unused_at: dict[str, list] = {}  # field -> [how many records hold it, where the first one is]
        self._empty_replies: list = [0, None]  # [records whose every reply is empty, where the first one is]
        self._finished = False

    def batches(self, size: int = 1024) -> Iterator[list[tuple[str, list[dict]]]]:
        """Lists of at most `size` (place, conversation); a table's columns are checked before its first row."""
        self.count, self._unused_at, self._empty_replies, self._finished = 0, {}, [0, None], False
        for name, schema in self.source.schemas():
            self.columns.check_schema(name, schema, text_cells=self.source.text_cells)
        for batch in self.source.record_batches(size):
            yield [(where, self._conversation(where, record)) for where, record in batch]
        self._finished = True

    def _conversation(self, where: str, record: object) -> list[dict]:
        source = self.source
        record = self.columns.prepare(record, where, from_table=source.from_table, text_cells=source.text_cells)
        turns, unused = _normalise(record, where)
        self.count += 1
        for name in unused:
            self._unused_at.setdefault(name, [0, where])[0] += 1
        replies = [turn["content"] for turn in turns if turn["role"] == "assistant"]
        if replies and not any(isinstance(reply, str) and reply.strip() for reply in replies):
            self._empty_replies[0] += 1
            self._empty_replies[1] = self._empty_replies[1] or where
        return turns

    @property
    def ignored(self) -> list[str]:
        """One note per field no record's shape read, with how many records hold it and where the first is; and one
        for records whose every reply is empty (they would teach the model to answer nothing)."""
        if not self._finished:
            raise RuntimeError("ConversationStream.ignored is known once batches() has been read to its end")
        notes = [
            f"{self.source.spec}: field {name!r} is not used ({count} of {self.count} records; first at {first})"
            for name, (count, first) in self._unused_at.items()
        ]
        empty, first = self._empty_replies
        if empty:
            notes.append(f"{self.source.spec}: {empty} of {self.count} records have only empty replies (first at "
                         f"{first}); they train on the end-of-turn token alone: fill in or drop their output")
        return notes


def read_examples(path: str | Path | DataSource, columns: Columns = None) -> LoadedExamples:
    """Every conversation of a data source (a file, folder, glob or datasets folder; see open_source), at once.

    Each conversation is a list of {"role", "content"} dicts with roles system/user/assistant, or a
    single {"role": "text"} message for plain-text records. `columns` maps the data's column names to
    the record fields (ColumnMap.parse). Fields that the record's shape does not read are listed in
    `ignored`, one note per field. For data too large to hold, use ConversationStream.
    """
    source = path if isinstance(path, DataSource) else open_source(path)
    stream = ConversationStream(source, columns)
    conversations = [turns for batch in stream.batches() for _, turns in batch]
    return LoadedExamples(conversations, stream.ignored, source)


def load_examples(path: str | Path | DataSource, columns: Columns = None) -> list[list[dict]]:
    """The conversations of read_examples(path); each note about an unused field becomes a warning.

    For library callers that want only the conversations: the warnings make sure they still learn
    which of their fields had no effect.
    """
    loaded = read_examples(path, columns)
    for note in loaded.ignored:
        warnings.warn(note, stacklevel=2)
    return loaded.conversations


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
        f"{where}: record with keys {sorted(record)} matches no accepted shape; expected {ACCEPTED_SHAPES} "
        "(--columns maps other names to these, e.g. --columns output=answer)"
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

