"""Tests for `lorafit cache` (lorafit.cli.cache): the folders and their sizes, and --clear-data."""

import json

from lorafit.cli.main import main
from lorafit.data.prepared import prepare_source
from lorafit.data.sources import open_source
from tests.conftest import CHATML_TEMPLATE, byte_tokenizer


def test_cache_lists_the_prepared_data_and_clear_data_removes_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORAFIT_DATA_CACHE", str(tmp_path / "data-cache"))
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    source = open_source(str(data))
    prepare_source(byte_tokenizer(chat_template=CHATML_TEMPLATE), source, None, source.fingerprint(), 64, False)
    capsys.readouterr()
    assert main(["cache"]) == 0
    assert f"data (prepared, tokenised data): {tmp_path / 'data-cache'} — 1 entry" in capsys.readouterr().out
    assert main(["cache", "--clear-data"]) == 0
    assert "cleared the prepared data: 1 entry" in capsys.readouterr().out
    assert list((tmp_path / "data-cache").iterdir()) == []
