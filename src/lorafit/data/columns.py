"""--columns: the data's own names for lorafit's record fields, and the checks a table's columns get up front.

Datasets name their columns as they like ('question'/'answer', ShareGPT's 'from'/'value' with 'human'
and 'bot'); a ColumnMap renames them to the fields records.py reads, using LLaMA-Factory's key names
for the message-level tags. Columns not mapped keep their own names, so 'output=answer' alone works for
data whose other column is already called 'instruction'. The record shapes themselves are records.py's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import pyarrow as pa

from lorafit.errors import LorafitError, brief

CHAT_MESSAGE_KEYS = ("role", "content")
SHAREGPT_MESSAGE_KEYS = ("from", "value")
# What a table column must hold for each field lorafit reads; a column for another name is not looked at.
FIELD_NEEDS = {
    "instruction": "text", "input": "text", "output": "text", "system": "text", "text": "text",
    "prompt": "text or messages", "completion": "text or messages",
    "messages": "messages", "conversations": "messages", "history": "pairs",
}
RECORD_FIELDS = tuple(FIELD_NEEDS)
MESSAGE_LISTS = {"messages": CHAT_MESSAGE_KEYS, "conversations": SHAREGPT_MESSAGE_KEYS,
                 "prompt": CHAT_MESSAGE_KEYS, "completion": CHAT_MESSAGE_KEYS}
ROLE_TAGS = {"user_tag": "user", "assistant_tag": "assistant", "system_tag": "system"}  # tag -> lorafit's role
KEYS = (*RECORD_FIELDS, "role_tag", "content_tag", *ROLE_TAGS)
JSON_TEXT_LISTS = ("messages", "conversations", "history")  # in CSV cells these are JSON text, always
_NEEDS_IN_WORDS = {
    "text": "text (a string column)",
    "text or messages": "text, or a list of {role, content} structs",
    "messages": "a list of structs, one per message",
    "pairs": "a list of [instruction, response] pairs",
}


@dataclass(frozen=True)
class ColumnMap:
    """lorafit field -> the data's column (`fields`) and message tag -> the data's key or role name (`tags`)."""

    fields: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    flag: str = "--columns"

    @classmethod
    def parse(cls, items: ColumnMap | Mapping | list | tuple | str | None, flag: str = "--columns") -> ColumnMap:
        """From the CLI's KEY=COLUMN items (a string: items separated by spaces) or a YAML/library mapping."""
        if items is None or isinstance(items, ColumnMap):
            return items or cls(flag=flag)
        if isinstance(items, Mapping):
            pairs = [(str(key), column, f"{key}: {column}") for key, column in items.items()]
        elif isinstance(items, (list, tuple, str)):
            pairs = [_split_item(item, flag) for item in (items.split() if isinstance(items, str) else items)]
        else:
            raise LorafitError(f"{flag}: expected KEY=COLUMN items or a mapping, got {type(items).__name__}")
        given: dict[str, tuple[str, str]] = {}
        for key, column, item in pairs:
            _check_pair(key, column, item, given, flag)
            given[key] = (column, item)
        fields = {key: column for key, (column, _) in given.items() if key in FIELD_NEEDS}
        tags = {key: column for key, (column, _) in given.items() if key not in FIELD_NEEDS}
        _check_distinct(fields, flag, "column")
        _check_distinct({key: tags[key] for key in ROLE_TAGS if key in tags}, flag, "role name")
        _check_distinct({key: tags[key] for key in ("role_tag", "content_tag") if key in tags}, flag, "message key")
        return cls(fields, tags, flag)

    def __bool__(self) -> bool:
        return bool(self.fields or self.tags)

    def check_schema(self, name: str, schema: pa.Schema, *, text_cells: bool = False) -> None:
        """Before a table's first row: every mapped column exists, and each field's column has a usable type.

        CSV's cells are all text (lists in them are JSON text), so there only the names are checked.
        """
        names = schema.names
        twice = sorted({column for column in names if names.count(column) > 1})
        if twice:
            raise LorafitError(f"{name}: two columns are named {twice[0]!r}; rename one")
        for field_name, column in self.fields.items():
            if column not in names:
                raise LorafitError(
                    f"{name}: {self.flag} {field_name}={column}: no column {column!r}; "
                    f"its columns are {brief(names, 12)}"
                )
        self._refuse_shadowed(set(names), name)
        read_as = {column: field_name for field_name, column in self.fields.items()}
        for column in names:
            field_name = read_as.get(column, column)
            if field_name in FIELD_NEEDS and not text_cells:
                self._check_type(name, column, field_name, schema.field(column).type)

    def prepare(self, record: object, where: str, *, from_table: bool, text_cells: bool) -> object:
        """The record under lorafit's field names: columns renamed, CSV's JSON text decoded, messages mapped.

        A JSON record must hold every mapped column; a table row may lack one, as its null was left out.
        """
        if not isinstance(record, dict):
            return record  # records.py says what a record must be
        record = self._renamed(record, where, require_columns=not from_table)
        if text_cells:
            record = _decoded_text_cells(record, where)
        return self._mapped_messages(record, where) if self.tags else record

    def _renamed(self, record: dict, where: str, require_columns: bool) -> dict:
        if not self.fields:
            return record
        for field_name, column in self.fields.items():
            if require_columns and column not in record:
                keys = ", ".join(map(str, record)) or "none"
                raise LorafitError(
                    f"{where}: {self.flag} {field_name}={column}: the record has no {column!r} (its keys: {keys})"
                )
        self._refuse_shadowed(set(record), where)
        renamed = {key: value for key, value in record.items() if key not in self.fields.values()}
        renamed.update({name: record[column] for name, column in self.fields.items() if column in record})
        return renamed

    def _shadowed(self, present: set) -> list[str]:
        """Fields the data holds under their own name while --columns takes that field from another column."""
        sources = set(self.fields.values())
        return [name for name, column in self.fields.items()
                if name != column and name in present and name not in sources]

    def _refuse_shadowed(self, present: set, where: str) -> None:
        shadowed = self._shadowed(present)
        if shadowed:
            name = shadowed[0]
            raise LorafitError(
                f"{where}: {self.flag} {name}={self.fields[name]}, but there is a column {name!r} too; "
                "drop or rename one of the two, so that which is meant is not a guess"
            )

    def _check_type(self, name: str, column: str, field_name: str, kind: pa.DataType) -> None:
        if _holds(FIELD_NEEDS[field_name], kind):
            return
        mapped = f" ({self.flag} {field_name}={column})" if column != field_name else ""
        raise LorafitError(
            f"{name}: column {column!r}{mapped} is {kind}, but {field_name} needs "
            f"{_NEEDS_IN_WORDS[FIELD_NEEDS[field_name]]}; convert the column"
        )

    def _mapped_messages(self, record: dict, where: str) -> dict:
        mapped = dict(record)
        for list_name, ours in MESSAGE_LISTS.items():
            if isinstance(record.get(list_name), list):
                mapped[list_name] = [
                    self._message(message, ours, f"{where}: {list_name}[{index}]") if isinstance(message, dict)
                    else message
                    for index, message in enumerate(record[list_name])
                ]
        return mapped

    def _message(self, message: dict, ours: tuple[str, str], where: str) -> dict:
        """One message with the tags' keys renamed (role_tag -> 'role') and role names mapped ('human' -> 'user')."""
        role_key, content_key = ours
        keys = {self.tags.get("role_tag", role_key): role_key, self.tags.get("content_tag", content_key): content_key}
        for given, our_key in keys.items():
            if given != our_key and given in message and our_key in message:
                raise LorafitError(
                    f"{where} has both {given!r} and {our_key!r}; {self.flag} maps {given!r} to {our_key!r}"
                )
        renamed = {keys.get(key, key): value for key, value in message.items()}
        roles = {self.tags[tag]: role for tag, role in ROLE_TAGS.items() if tag in self.tags}
        if isinstance(renamed.get(role_key), str) and renamed[role_key] in roles:
            renamed[role_key] = roles[renamed[role_key]]
        return renamed


def _split_item(item: object, flag: str) -> tuple[str, str, str]:
    key, equals, column = str(item).partition("=")
    if not (isinstance(item, str) and equals and key.strip() and column.strip()):
        raise LorafitError(f"{flag}: {item!r} is not KEY=COLUMN (e.g. output=answer); keys are {', '.join(KEYS)}")
    return key.strip(), column.strip(), item


def _check_pair(key: str, column: object, item: str, given: dict, flag: str) -> None:
    if key not in KEYS:
        raise LorafitError(f"{flag}: unknown key {key!r} in {item!r}; keys are {', '.join(KEYS)}")
    if key in given:
        raise LorafitError(
            f"{flag}: {key!r} is given twice ({given[key][1]!r} and {item!r}); keys are {', '.join(KEYS)}"
        )
    if not (isinstance(column, str) and column):
        raise LorafitError(f"{flag}: {item!r} needs a column name (a non-empty string) for {key!r}")


def _check_distinct(mapping: dict[str, str], flag: str, what: str) -> None:
    """Two keys taking the same column (or role name) would make one value two things."""
    seen: dict[str, str] = {}
    for key, value in mapping.items():
        if value in seen:
            raise LorafitError(f"{flag}: {seen[value]} and {key} both name the {what} {value!r}; give each its own")
        seen[value] = key


def _holds(need: str, kind: pa.DataType) -> bool:
    """Whether an Arrow type can hold what a field needs (a column of nulls holds anything)."""
    if pa.types.is_dictionary(kind):  # pandas' categorical columns arrive as dictionary<values=string>
        kind = kind.value_type
    text = pa.types.is_string(kind) or pa.types.is_large_string(kind) or str(kind) == "string_view"
    listed = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    structs = listed and pa.types.is_struct(kind.value_type)
    return pa.types.is_null(kind) or {
        "text": text, "text or messages": text or structs, "messages": structs, "pairs": listed,
    }[need]


def _decoded_text_cells(record: dict, where: str) -> dict:
    """CSV cells are text, so lists in them are JSON text: decoded for the fields that hold lists.

    A prompt or completion cell is decoded only when it is a JSON list of objects: either form is allowed
    there, and a plain prompt that happens to start with '[' stays text.
    """
    decoded = dict(record)
    for name in JSON_TEXT_LISTS:
        if isinstance(record.get(name), str):
            try:
                decoded[name] = json.loads(record[name])
            except ValueError as err:
                raise LorafitError(
                    f"{where}: {name} is not JSON text ({err}); in a CSV cell a list is written as JSON, "
                    'e.g. [{"role": "user", "content": "hi"}]'
                ) from None
    for name in ("prompt", "completion"):
        value = record.get(name)
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                listed = json.loads(value)
            except ValueError:
                continue
            if isinstance(listed, list) and listed and all(isinstance(item, dict) for item in listed):
                decoded[name] = listed
    return decoded
