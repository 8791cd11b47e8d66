"""The README's examples run as written and print what the README says they print."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lorafit.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str, after: str) -> list[str]:
    """Fenced code blocks of `language` in the README section that starts with heading `after`."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index(after):]
    section = section[: section.find("\n## ", len(after))]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def test_library_example_runs_and_prints_the_report_it_shows(tmp_path, monkeypatch, capsys):
    code = _blocks("python", "## Library")[0]
    shown = re.search(r"print\(lorafit\.report\(model\)\)\s+# (.*)", code).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert shown in capsys.readouterr().out
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()


def test_fused_slices_example_builds_its_config():
    import lorafit

    namespace = {"lorafit": lorafit}
    exec(compile(_blocks("python", "## Library")[1], "README.md", "exec"), namespace)
    assert namespace["cfg"].fused_slices["query_key_value"].adapt == ("q", "v")


def test_inspect_example_prints_the_seeds_figures(monkeypatch, capsys):
    block = next(b for b in _blocks("bash", "## Library") if b.startswith("lorafit inspect"))
    command, comment = block.strip().splitlines()
    monkeypatch.chdir(README.parent)
    assert main(command.split()[1:]) == 0
    expected = comment.removeprefix("# ... ")
    assert expected in capsys.readouterr().out
    assert "4,194,304" in expected and "6,738,415,616" in expected and "0.062%" in expected


@pytest.mark.slow
def test_own_data_example_trains_on_the_embedded_model(tmp_path):
    block = _blocks("bash", "## Command line")[-1].replace("/tmp/", f"{tmp_path}/")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "tiny-run" / "adapter" / "adapter_model.safetensors").exists()


def test_estimate_example_plans_the_seeds_run(capsys):
    """The README's `lorafit estimate` line for the seed's run prints the weights and the verdict it quotes."""
    block = next(b for b in _blocks("bash", "### Will it fit?") if b.startswith("lorafit estimate"))
    argv = block.split("\n")[0:2]
    command = " ".join(line.split("#")[0].rstrip(" \\") for line in argv).split()[1:]
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "weights, float16" in out and "12,852.5 MiB" in out
    assert "verdict: fits in 32.00 GiB" in out
    readme = README.read_text(encoding="utf-8")
    total = re.search(r"total\s+[\d,.]+ MiB \(([\d.]+) GiB\)", out).group(1)
    assert f"total {total} GiB of 32: fits" in readme  # the fp16 column, as the command plans it


@pytest.mark.slow
def test_export_example_writes_both_files_from_a_trained_run(trained_default_run, tmp_path, monkeypatch):
    """The `lorafit export` lines of "Run it in llama.cpp / Ollama", on the default job's run (trained once for
    the slow tests); llama.cpp runs what they write in tests/export/test_in_llama_cpp.py."""
    block = _blocks("bash", "### Run it in llama.cpp")[0]
    lines = [line.split("#")[0].split() for line in block.strip().splitlines()]
    assert lines[0][:2] == ["lorafit", "train"]
    exports = [line for line in lines if line[:2] == ["lorafit", "export"]]
    assert len(exports) == 2
    monkeypatch.chdir(tmp_path)
    for command in exports:
        args = [str(trained_default_run) if arg == "runs/dates" else arg for arg in command[1:]]
        assert main(args) == 0
    assert (tmp_path / "dates-lora.gguf").stat().st_size < 2**20 < (tmp_path / "dates.gguf").stat().st_size
