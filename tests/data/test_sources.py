"""Tests for lorafit.data.sources and columns: the same conversations from a JSONL file and from its Parquet,
CSV/TSV, Arrow, datasets save_to_disk, sharded-folder, glob and gzip twins; --columns; every error as one
line naming the file and the row; fingerprints over every file read; reading in bounded batches."""

import gzip
import json
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.ipc as pa_ipc
import pyarrow.parquet as pq
import pytest

from lorafit.data.columns import KEYS, ColumnMap
from lorafit.data.records import ConversationStream, read_examples
from lorafit.data.sources import DataSource, held_out_split, open_source
from lorafit.errors import LorafitError
from lorafit.models.identity import file_sha256

datasets.disable_progress_bars()

Q = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}
# The first record of each holds every key: datasets.Dataset.from_list takes its columns from it.
SHAPES = {
    "alpaca": [
        {"instruction": "i0", "input": "x", "output": "o0", "system": "s", "history": [["h", "r"]]},
        {"instruction": "i1", "output": "o1"},  # input, system, history: null in a table, absent here
    ],
    "messages": [
        {"messages": [{"role": "system", "content": "s"}, Q, A]},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    ],
    "sharegpt": [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "s"},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
    ],
}


# --- writing the same records in every format, with the writers people use -------------------------


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_parquet(path, records):
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def write_csv(path, records, delimiter=","):
    """Lists as JSON text in their cells, as a spreadsheet or pandas would hold them."""
    cells = [{key: json.dumps(value) if isinstance(value, list) else value for key, value in record.items()}
             for record in records]
    with pa.CompressedOutputStream(str(path), "gzip") if path.name.endswith(".gz") else open(path, "wb") as out:
        pa_csv.write_csv(pa.Table.from_pylist(cells), out, pa_csv.WriteOptions(delimiter=delimiter))
    return path


def write_arrow(path, records, stream=False):
    table = pa.Table.from_pylist(records)
    with (pa_ipc.new_stream if stream else pa_ipc.new_file)(path, table.schema) as writer:
        writer.write_table(table)
    return path


def datasets_to_parquet(path, records):
    datasets.Dataset.from_list(records).to_parquet(path)
    return path


def save_to_disk(path, records):
    datasets.Dataset.from_list(records).save_to_disk(path)
    return path


def write_gzip(path, text):
    path.write_bytes(gzip.compress(text.encode("utf-8")))
    return path


TWINS = {
    "parquet": lambda folder, records: write_parquet(folder / "data.parquet", records),
    "datasets.to_parquet": lambda folder, records: datasets_to_parquet(folder / "d.parquet", records),
    "csv": lambda folder, records: write_csv(folder / "data.csv", records),
    "tsv": lambda folder, records: write_csv(folder / "data.tsv", records, delimiter="\t"),
    "csv.gz": lambda folder, records: write_csv(folder / "data.csv.gz", records),
    "arrow file": lambda folder, records: write_arrow(folder / "data.arrow", records),
    "arrow stream": lambda folder, records: write_arrow(folder / "data.arrow", records, stream=True),
    "save_to_disk": lambda folder, records: save_to_disk(folder / "hf", records),
    "json list": lambda folder, records: _write(folder / "data.json", json.dumps(records)),
    "jsonl.gz": lambda folder, records: write_gzip(folder / "data.jsonl.gz", _jsonl_text(records)),
    "json.gz": lambda folder, records: write_gzip(folder / "data.json.gz", json.dumps(records)),
    "folder of shards": lambda folder, records: _shards(folder / "shards", records),
    "glob": lambda folder, records: _shards(folder / "shards", records, parquet=True) / "*.parquet",
    "recursive glob": lambda folder, records: _nested(folder / "tree", records) / "**" / "*.jsonl",
}


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl_text(records):
    return "".join(json.dumps(record) + "\n" for record in records)


def _shards(folder, records, parquet=False):
    folder.mkdir()
    for index, record in enumerate(records):
        if parquet:
            write_parquet(folder / f"part-{index:03}.parquet", [record])
        else:
            write_jsonl(folder / f"part-{index:03}.jsonl", [record])
    (folder / "README.md").write_text("# about this data\n")
    (folder / ".hidden.jsonl").write_text("not json")
    return folder


def _nested(folder, records):
    for index, record in enumerate(records):
        (folder / f"sub{index}").mkdir(parents=True)
        write_jsonl(folder / f"sub{index}" / "part.jsonl", [record])
    return folder


def read_error(spec, columns=None) -> str:
    with pytest.raises(LorafitError) as caught:
        read_examples(spec, columns)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("twin", TWINS)
def test_every_format_gives_the_conversations_of_the_jsonl_file(tmp_path, shape, twin):
    records = SHAPES[shape]
    expected = read_examples(write_jsonl(tmp_path / "data.jsonl", records))
    loaded = read_examples(str(TWINS[twin](tmp_path, records)))
    assert loaded.conversations == expected.conversations
    assert loaded.ignored == expected.ignored == []


def test_what_each_spec_is_read_as(tmp_path):
    records = SHAPES["alpaca"]
    cases = {
        write_jsonl(tmp_path / "a.jsonl", records): ("file", "jsonl"),
        _write(tmp_path / "list.jsonl", json.dumps(records)): ("file", "json"),  # told by content
        _write(tmp_path / "lines.json", _jsonl_text(records)): ("file", "jsonl"),
        write_parquet(tmp_path / "table.bin", records): ("file", "parquet"),  # by its PAR1 magic
        write_arrow(tmp_path / "s.feather", records, stream=True): ("file", "arrow"),
        save_to_disk(tmp_path / "hf", records): ("datasets", "datasets"),
    }
    for path, (kind, format) in cases.items():
        source = open_source(path)
        assert (source.kind, source.format) == (kind, format), path


def test_describe_names_the_spec_the_format_and_the_files(tmp_path):
    one = write_parquet(tmp_path / "train.parquet", SHAPES["alpaca"])
    assert open_source(one).describe() == f"{one} (parquet, 1 file)"
    shards = _shards(tmp_path / "shards", SHAPES["alpaca"])
    assert open_source(shards).describe() == f"{shards} (jsonl, 2 files; not read: README.md)"
    assert open_source(f"{shards}/*.jsonl").describe() == f"{shards}/*.jsonl (jsonl, 2 files)"
    folder = tmp_path / "hfd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(SHAPES["alpaca"])}).save_to_disk(folder)
    assert open_source(folder).describe() == f"{folder} (datasets save_to_disk folder, split 'train')"
    assert open_source(save_to_disk(tmp_path / "hf", SHAPES["alpaca"])).describe() == (
        f"{tmp_path / 'hf'} (datasets save_to_disk folder)"
    )


# --- folders: what is read and what is not ----------------------------------------------------------


def test_a_folder_reads_its_own_data_files_in_name_order_and_names_the_rest(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", [{"text": "second"}])
    write_jsonl(folder / "a.jsonl", [{"text": "first"}])
    (folder / "stats.json").write_text('{"rows": 2}')  # beside other data, a .json file is metadata
    (folder / "_SUCCESS").write_text("")
    (folder / ".cache").mkdir()
    (folder / "nested").mkdir()
    write_jsonl(folder / "nested" / "c.jsonl", [{"text": "not read"}])
    source = open_source(folder)
    assert source.files == (folder / "a.jsonl", folder / "b.jsonl")
    assert source.skipped == (folder / "nested", folder / "stats.json")
    assert source.describe() == f"{folder} (jsonl, 2 files; not read: nested/, stats.json)"
    assert [c[0]["content"] for c in read_examples(folder).conversations] == ["first", "second"]


def test_a_folder_of_json_lists_reads_them(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _write(folder / "a.json", json.dumps([{"text": "a"}]))
    _write(folder / "b.json", json.dumps([{"text": "b"}]))
    source = open_source(folder)
    assert (source.format, source.files) == ("json", (folder / "a.json", folder / "b.json"))


def test_folder_errors(tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "a.jsonl", [{"text": "a"}])
    write_parquet(mixed / "b.parquet", [{"text": "b"}])
    assert read_error(mixed) == (
        f"{mixed}: mixes data formats: a.jsonl is jsonl, b.parquet is parquet; keep one format together, "
        "or pick one with a glob"
    )
    split = tmp_path / "split"
    split.mkdir()
    write_jsonl(split / "train.jsonl", [{"text": "a"}])
    write_jsonl(split / "test.jsonl", [{"text": "b"}])
    assert read_error(split) == (
        f"{split}: test.jsonl looks like held-out data next to train.jsonl, and a folder is read whole; "
        f"give the training files alone, e.g. '{split}/train*.jsonl'"
    )
    assert read_examples(f"{split}/train*.jsonl").conversations == [[{"role": "text", "content": "a"}]]
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "README.md").write_text("hi")
    assert read_error(empty).startswith(f"{empty}: no data files in this folder (other files: 1, subfolders: 1); ")


def test_glob_errors(tmp_path):
    assert read_error(str(tmp_path / "*.parquet")) == f"--data {tmp_path}/*.parquet: the pattern matches no files"
    with pytest.raises(LorafitError, match=r"^--eval-data .*/x\*\.csv: the pattern matches no files$"):
        open_source(str(tmp_path / "x*.csv"), flag="--eval-data")
    _write(tmp_path / "notes.txt", "plain words")
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    assert read_error(str(tmp_path / "*")).startswith(f"{tmp_path / 'notes.txt'}: not a data file type lorafit reads")


def test_unknown_extension_lists_what_is_accepted(tmp_path):
    path = _write(tmp_path / "data.txt", "just some text")
    assert read_error(path) == (
        f"{path}: not a data file type lorafit reads (.txt); accepted: .jsonl, .json, .parquet, .csv, .tsv, "
        ".arrow (the text ones also gzipped, e.g. .jsonl.gz), a folder of such files, a glob, or a datasets "
        "save_to_disk folder"
    )
    # JSON content is read whatever the name says, as before folders and tables existed
    assert read_examples(_write(tmp_path / "data.txt", '{"text": "t"}\n')).conversations == [
        [{"role": "text", "content": "t"}]
    ]


# --- datasets save_to_disk folders and DatasetDict splits ---------------------------------------------


def _dataset_dict(folder, **splits):
    datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(folder)
    return folder


def test_dataset_dict_reads_train_and_holds_out_validation_else_test(tmp_path):
    train, validation, test = [{"text": "train"}], [{"text": "validation"}], [{"text": "test"}]
    both = _dataset_dict(tmp_path / "both", train=train, validation=validation, test=test)
    source = open_source(both)
    assert source.split == "train"
    assert read_examples(both).conversations == [[{"role": "text", "content": "train"}]]
    held_out = held_out_split(source)
    assert held_out.split == "validation" and held_out.describe() == f"{both} (datasets save_to_disk folder, split " \
        "'validation')"
    batches = list(held_out.record_batches(8))
    assert batches == [[(f"{both / 'validation'}[0]", {"text": "validation"})]]
    assert read_examples(held_out).conversations == [[{"role": "text", "content": "validation"}]]
    assert held_out_split(open_source(_dataset_dict(tmp_path / "t", train=train, test=test))).split == "test"
    assert held_out_split(open_source(_dataset_dict(tmp_path / "only", train=train))) is None
    assert held_out_split(open_source(write_jsonl(tmp_path / "a.jsonl", train))) is None


def test_dataset_dict_without_train_names_its_splits(tmp_path):
    folder = _dataset_dict(tmp_path / "hfd", test=[{"text": "a"}], validation=[{"text": "b"}])
    assert read_error(folder) == (
        f"{folder}: this datasets DatasetDict has no 'train' split (it has test, validation); "
        f"give one split's folder instead, e.g. {folder / 'test'}"
    )
    assert read_examples(folder / "test").conversations == [[{"role": "text", "content": "a"}]]


def test_datasets_files_are_its_arrow_files_and_metadata(tmp_path):
    folder = save_to_disk(tmp_path / "hf", SHAPES["messages"])
    assert [path.name for path in open_source(folder).files] == [
        "data-00000-of-00001.arrow", "dataset_info.json", "state.json"
    ]


# --- --columns ------------------------------------------------------------------------------------------


def test_question_answer_columns_map_to_instruction_and_output(tmp_path):
    records = [{"question": "q", "answer": "a", "id": 7}]
    expected = [[Q, A]]
    for path in (write_jsonl(tmp_path / "qa.jsonl", records), write_parquet(tmp_path / "qa.parquet", records),
                 write_csv(tmp_path / "qa.csv", records)):
        loaded = read_examples(path, ["instruction=question", "output=answer"])
        assert loaded.conversations == expected
        assert loaded.ignored == [f"{path}: field 'id' is not used (1 of 1 records; first at {loaded_first(path)})"]
    assert read_examples(tmp_path / "qa.parquet", {"instruction": "question", "output": "answer"}).conversations == (
        expected)


def loaded_first(path: Path) -> str:
    return f"{path}:1" if path.suffix == ".jsonl" else f"{path}[row 0]" if path.suffix == ".csv" else f"{path}[0]"


def test_unmapped_columns_keep_their_names(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", [{"instruction": "q", "answer": "a"}])
    assert read_examples(path, "output=answer").conversations == [[Q, A]]


def test_sharegpt_from_value_with_role_tags(tmp_path):
    records = [{"dialog": [{"speaker": "customer", "says": "q"}, {"speaker": "bot", "says": "a"}]}]
    columns = ["conversations=dialog", "role_tag=speaker", "content_tag=says", "user_tag=customer",
               "assistant_tag=bot"]
    for path in (write_jsonl(tmp_path / "d.jsonl", records), write_parquet(tmp_path / "d.parquet", records),
                 write_csv(tmp_path / "d.csv", records)):
        assert read_examples(path, columns).conversations == [[Q, A]]


def test_from_value_onto_messages_and_user_tag_human(tmp_path):
    records = [{"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}]
    path = write_parquet(tmp_path / "d.parquet", records)
    columns = "messages=conversations role_tag=from content_tag=value user_tag=human assistant_tag=bot"
    assert read_examples(path, columns).conversations == [[Q, A]]
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "human", "content": "q"},
                                                               {"role": "bot", "content": "a"}]}])
    assert read_examples(chat, ["user_tag=human", "assistant_tag=bot"]).conversations == [[Q, A]]
    assert read_error(chat).endswith("messages[0].role 'human' is not one of system, user, assistant")


def test_column_map_parse_errors_name_the_flag_and_list_the_keys():
    keys = ", ".join(KEYS)
    cases = {
        ("answer=output",): f"--columns: unknown key 'answer' in 'answer=output'; keys are {keys}",
        ("output",): f"--columns: 'output' is not KEY=COLUMN (e.g. output=answer); keys are {keys}",
        ("output=",): f"--columns: 'output=' is not KEY=COLUMN (e.g. output=answer); keys are {keys}",
        ("output=a", "output=b"): f"--columns: 'output' is given twice ('output=a' and 'output=b'); keys are {keys}",
        ("instruction=q", "input=q"): "--columns: instruction and input both name the column 'q'; give each its own",
        ("user_tag=x", "assistant_tag=x"): "--columns: user_tag and assistant_tag both name the role name 'x'; "
                                           "give each its own",
    }
    for items, expected in cases.items():
        with pytest.raises(LorafitError, match=f"^{re.escape(expected)}$"):
            ColumnMap.parse(list(items))
    with pytest.raises(LorafitError, match=r"^--eval-columns: unknown key 'x' in 'x: y'; keys are instruction, "):
        ColumnMap.parse({"x": "y"}, flag="--eval-columns")
    with pytest.raises(LorafitError, match=r"^--columns: 'output: 3' needs a column name \(a non-empty string\)"):
        ColumnMap.parse({"output": 3})


def test_column_map_parse_forms():
    assert not ColumnMap.parse(None) and not ColumnMap.parse([]) and not ColumnMap.parse({})
    parsed = ColumnMap.parse([" output = answer ", "role_tag=from"])
    assert (dict(parsed.fields), dict(parsed.tags)) == ({"output": "answer"}, {"role_tag": "from"})
    assert ColumnMap.parse(parsed) is parsed
    assert ColumnMap.parse("output=answer role_tag=from") == parsed


def test_a_mapped_column_missing_from_a_table_names_the_columns_there(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", [{"question": "q", "response": "a"}])
    assert read_error(path, ["instruction=question", "output=answer"]) == (
        f"{path}: --columns output=answer: no column 'answer'; its columns are question, response"
    )
    csv = write_csv(tmp_path / "d.csv", [{"question": "q", "response": "a"}])
    assert read_error(csv, ["output=answer"]) == (
        f"{csv}: --columns output=answer: no column 'answer'; its columns are question, response"
    )


def test_a_json_record_missing_a_mapped_column_names_its_line_and_keys(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}, {"question": "q", "reply": "a"}])
    assert read_error(path, ["instruction=question", "output=answer"]) == (
        f"{path}:2: --columns output=answer: the record has no 'answer' (its keys: question, reply)"
    )


def test_a_mapped_field_that_the_data_also_holds_is_refused(tmp_path):
    records = [{"instruction": "q", "output": "o", "answer": "a"}]
    parquet = write_parquet(tmp_path / "d.parquet", records)
    message = ("--columns output=answer, but there is a column 'output' too; drop or rename one of the two, so "
               "that which is meant is not a guess")
    assert read_error(parquet, ["output=answer"]) == f"{parquet}: {message}"
    jsonl = write_jsonl(tmp_path / "d.jsonl", records)
    assert read_error(jsonl, ["output=answer"]) == f"{jsonl}:1: {message}"


def test_a_message_holding_both_the_tag_and_our_key_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"from": "user", "role": "user", "content": "q"}, A]}])
    assert read_error(path, ["role_tag=from"]) == (
        f"{path}:1: messages[0] has both 'from' and 'role'; --columns maps 'from' to 'role'"
    )


# --- tables: types up front, nulls, CSV text, row places --------------------------------------------


def test_a_column_of_the_wrong_type_is_refused_before_any_row(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", [{"instruction": "q", "output": 4}])
    assert read_error(path) == (
        f"{path}: column 'output' is int64, but output needs text (a string column); convert the column"
    )
    mapped = write_parquet(tmp_path / "m.parquet", [{"instruction": "q", "answer": 4}])
    assert read_error(mapped, ["output=answer"]) == (
        f"{mapped}: column 'answer' (--columns output=answer) is int64, but output needs text (a string column); "
        "convert the column"
    )
    listed = write_arrow(tmp_path / "l.arrow", [{"messages": ["q", "a"]}])
    assert read_error(listed) == (
        f"{listed}: column 'messages' is list<item: string>, but messages needs a list of structs, one per message; "
        "convert the column"
    )
    folder = save_to_disk(tmp_path / "hf", [{"text": 3.5}])
    assert read_error(folder) == (
        f"{folder}: column 'text' is double, but text needs text (a string column); convert the column"
    )


def test_dictionary_encoded_text_is_text(tmp_path):
    """pandas' categorical columns are stored as dictionary<values=string>; their values are plain strings."""
    table = pa.table({"text": pa.array(["a", "b", "a"]).dictionary_encode()})
    pq.write_table(table, tmp_path / "d.parquet")
    assert pq.read_schema(tmp_path / "d.parquet").field("text").type == pa.dictionary(pa.int32(), pa.string())
    assert [c[0]["content"] for c in read_examples(tmp_path / "d.parquet").conversations] == ["a", "b", "a"]


def test_null_values_are_absent_fields(tmp_path):
    none = dict.fromkeys(["messages", "system", "id", "instruction", "output", "input", "history"])
    records = [{**none, "messages": [{"role": "user", "content": "q", "name": "ann"}, A]},
               {**none, "instruction": "i", "output": "o"}]
    path = write_parquet(tmp_path / "d.parquet", records)
    loaded = read_examples(path)
    assert loaded.conversations == [[Q, A], [{"role": "user", "content": "i"}, {"role": "assistant", "content": "o"}]]
    # 'name' is null in the second message (a struct has every field), so only the first holds it
    assert loaded.ignored == [
        f"{path}: field 'messages[].name' is not used (1 of 2 records; first at {path}[0])",
    ]


def test_row_errors_name_the_file_and_the_row_within_it(tmp_path):
    bad = {"messages": [Q, {"role": "bot", "content": "a"}]}
    folder = tmp_path / "shards"
    folder.mkdir()
    write_parquet(folder / "a.parquet", [{"messages": [Q, A]}] * 3)
    write_parquet(folder / "b.parquet", [{"messages": [Q, A]}, bad])
    expected = "messages[1].role 'bot' is not one of system, user, assistant"
    assert read_error(folder) == f"{folder / 'b.parquet'}[1]: {expected}"
    stream = write_arrow(tmp_path / "s.arrow", [bad], stream=True)
    assert read_error(stream) == f"{stream}[0]: {expected}"
    hf = save_to_disk(tmp_path / "hf", [{"messages": [Q, A]}, bad])
    assert read_error(hf) == f"{hf}[1]: {expected}"
    csv = write_csv(tmp_path / "d.csv", [{"messages": [Q, A]}, bad])
    assert read_error(csv) == f"{csv}[row 1]: {expected}"
    null_output = write_parquet(tmp_path / "n.parquet", [{"instruction": "i", "output": None}])
    assert read_error(null_output).startswith(f"{null_output}[0]: record with keys ['instruction'] matches no")


def test_csv_cells_are_text_and_json_text_holds_lists(tmp_path):
    path = _write(tmp_path / "d.csv", 'instruction,output,input\n2+2?,4,\n"multi\nline",007,x\n')
    assert read_examples(path).conversations == [
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "multi\nline\n\nx"}, {"role": "assistant", "content": "007"}],
    ]
    prompts = write_csv(tmp_path / "p.csv", [{"prompt": "[1, 2] sum?", "completion": "3"},
                                             {"prompt": [Q], "completion": [A]}])
    assert read_examples(prompts).conversations == [
        [{"role": "user", "content": "[1, 2] sum?"}, {"role": "assistant", "content": "3"}], [Q, A]
    ]
    bad = _write(tmp_path / "bad.csv", 'messages\n"[{""role"": ""user""}"\n')
    assert read_error(bad).startswith(f"{bad}[row 0]: messages is not JSON text (")


def test_a_ragged_csv_row_names_its_row_and_line(tmp_path):
    path = _write(tmp_path / "d.csv", 'text,id\n"one\ntwo",1\nthree,2,extra\n')
    assert read_error(path) == (
        f"{path}[row 1] (line 4): 3 cells, but the header has 2; quote any cell that holds a comma"
    )
    tsv = _write(tmp_path / "d.tsv", "text\tid\nsolo\n")
    assert read_error(tsv) == f"{tsv}[row 0] (line 2): 1 cell, but the header has 2; quote any cell that holds a tab"


def test_corrupt_tables_name_the_file_and_what_pyarrow_said(tmp_path):
    parquet = tmp_path / "d.parquet"
    parquet.write_bytes(b"PAR1 this is not really parquet")
    assert read_error(parquet) == (
        f"{parquet}: cannot read it as parquet: Parquet magic bytes not found in footer. Either the file is "
        "corrupted or this is not a parquet file."
    )
    arrow = tmp_path / "d.arrow"
    arrow.write_bytes(b"ARROW1\0\0 broken")
    assert read_error(arrow).startswith(f"{arrow}: cannot read it as arrow: ")
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "a"}\n')[:-12])
    assert read_error(gz).startswith(f"{gz}: cannot read the data file (")


def test_no_records(tmp_path):
    empty_table = tmp_path / "e.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty_table)
    assert read_error(empty_table) == f"{empty_table}: no records (an empty table)"
    header_only = _write(tmp_path / "h.csv", "text\n")
    assert read_error(header_only) == f"{header_only}: no records (an empty table)"
    folder = tmp_path / "shards"
    folder.mkdir()
    _write(folder / "a.jsonl", "")
    _write(folder / "b.jsonl", "\n")
    assert read_error(folder) == f"{folder} (jsonl, 2 files): no records (every file is empty)"
    assert read_error(_write(tmp_path / "e.jsonl", "")) == f"{tmp_path / 'e.jsonl'}: no records (the file is empty " \
        "or holds only blank lines)"


def test_json_errors_keep_their_file_line_places(tmp_path):
    path = write_gzip(tmp_path / "d.jsonl.gz", '{"text": "a"}\n\n{"text": "b",}\n')
    assert read_error(path).startswith(f"{path}:3: malformed JSON: ")
    assert read_error(tmp_path / "missing.jsonl") == f"data file not found: {tmp_path / 'missing.jsonl'}"
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": "caf\xe9"}\n')
    assert read_error(bom) == f"{bom}:2: not valid UTF-8 (byte 0xe9); re-save the file as UTF-8"
    pretty = _write(tmp_path / "pretty.json", '{\n  "data": [{"text": "a"}]\n}\n')
    assert "holds a single JSON object" in read_error(pretty)


# --- fingerprints ----------------------------------------------------------------------------------------


def test_a_single_files_fingerprint_is_its_plain_sha256(tmp_path):
    for path in (write_jsonl(tmp_path / "a.jsonl", SHAPES["alpaca"]), write_parquet(tmp_path / "a.parquet",
                                                                                     SHAPES["alpaca"])):
        assert open_source(path).fingerprint() == file_sha256(path)


def test_a_folders_fingerprint_covers_every_file_and_its_name(tmp_path):
    folder = _shards(tmp_path / "shards", SHAPES["alpaca"] * 2)
    before = open_source(folder).fingerprint()
    assert open_source(f"{folder}/*.jsonl").fingerprint() == before  # the same files, named from the same root
    write_jsonl(folder / "part-003.jsonl", [{"text": "changed"}])
    assert open_source(folder).fingerprint() != before
    (folder / "part-003.jsonl").rename(folder / "part-004.jsonl")
    renamed = open_source(folder).fingerprint()
    assert renamed != before
    (folder / "README.md").write_text("edited")  # not read, so not fingerprinted
    assert open_source(folder).fingerprint() == renamed


def test_a_datasets_folders_fingerprint_covers_its_arrow_files(tmp_path):
    one = open_source(save_to_disk(tmp_path / "one", [{"text": "a"}])).fingerprint()
    two = open_source(save_to_disk(tmp_path / "two", [{"text": "b"}])).fingerprint()
    assert one != two


# --- streaming -------------------------------------------------------------------------------------------


def test_record_batches_are_bounded_in_every_format(tmp_path):
    records = [{"text": f"t{index}"} for index in range(25)]
    table = pa.Table.from_pylist(records)
    pq.write_table(table, tmp_path / "groups.parquet", row_group_size=7)
    for path in (write_jsonl(tmp_path / "d.jsonl", records), tmp_path / "groups.parquet",
                 write_arrow(tmp_path / "one_batch.arrow", records), write_csv(tmp_path / "d.csv", records),
                 save_to_disk(tmp_path / "hf", records)):
        batches = list(open_source(path).record_batches(10))
        assert [len(batch) for batch in batches] == [10, 10, 5], path
        assert [record["text"] for batch in batches for _, record in batch] == [r["text"] for r in records]


def test_record_batches_read_lazily(tmp_path):
    """A broken record at line 30 is not reached before the first batches are handed out."""
    text = _jsonl_text([{"text": str(index)} for index in range(29)]) + "{broken\n"
    batches = open_source(_write(tmp_path / "d.jsonl", text)).record_batches(10)
    assert len(next(batches)) == 10 and len(next(batches)) == 10
    with pytest.raises(LorafitError, match=r":30: malformed JSON"):
        next(batches)


def test_conversation_stream_counts_and_notes_after_the_end(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", [{"text": str(index), "id": index} for index in range(5)])
    stream = ConversationStream(open_source(path))
    batches = stream.batches(2)
    first = next(batches)
    assert first == [(f"{path}[0]", [{"role": "text", "content": "0"}]), (f"{path}[1]", [{"role": "text",
                                                                                           "content": "1"}])]
    with pytest.raises(RuntimeError, match="read to its end"):
        _ = stream.ignored
    assert sum(len(batch) for batch in batches) == 3
    assert stream.count == 5
    assert stream.ignored == [f"{path}: field 'id' is not used (5 of 5 records; first at {path}[0])"]


def test_data_source_is_a_frozen_value(tmp_path):
    source = open_source(write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}]))
    assert isinstance(source, DataSource)
    with pytest.raises(AttributeError):
        source.format = "csv"
