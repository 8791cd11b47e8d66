"""The README's examples run as written and print what the README says they print.

Every fenced shell and Python block of the README is listed in BLOCKS by how it starts, with what this test
does with it: run it (as written: the only change a test may make is a shorter step count, where `STEPS` says
so, and an output path under a temporary folder), check it (a synopsis's flags must be the command's flags),
or leave it, saying why it cannot run here. A block the table does not know fails the first test, so an example
added to the README is either run here or says why not.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lorafit.cli.main import main

README = Path(__file__).resolve().parents[1] / "README.md"
REPO = README.parent

# how each block starts -> what the tests do with it ("run" and "check" blocks have a test below)
BLOCKS = {
    "make demo": "leave: the set-up commands themselves (CI runs `make test`; `make demo` is `lorafit train` with "
                 "no arguments, which the trained_default_run fixture runs)",
    "import torch\nfrom transformers import LlamaConfig": "run: test_library_example_runs_and_prints_the_report_it_shows",
    "qkv = lorafit.FusedSlices": "run: test_fused_slices_example_builds_its_config",
    "lorafit inspect --model-config": "run: test_inspect_example_prints_the_seeds_figures",
    "lorafit train [--model PATH]": "check: test_the_synopsis_names_only_real_flags",
    "lorafit estimate --model-config": "run: test_estimate_example_plans_the_seeds_run",
    "lorafit train --output runs/dates": "run: test_export_example_writes_both_files_from_a_trained_run",
    "llama-cli -m": "leave: llama.cpp's and Ollama's own programs are not on this machine (tests/formats/"
                    "test_in_llama_cpp.py runs both files in llama.cpp through llama-cpp-python)",
    "lorafit train --nproc 4": "run: test_torchrun_examples_run_as_written (the lines for one machine; two machines "
                               "are tested on loopback in tests/cli/test_train_distributed.py)",
    "#!/bin/bash\n#SBATCH": "leave: needs a SLURM cluster",
    "lorafit generate --adapter runs/dates": "run: test_generate_example_answers_with_the_trained_adapter",
    "printf '%s\\n' '{\"instruction\"": "run: test_own_data_example_trains_on_the_embedded_model",
    "python - <<'PY'\nimport pyarrow": "run: test_parquet_columns_example_trains_on_the_embedded_model",
}


def _all_blocks() -> list[tuple[str, str, str]]:
    """(heading of its section, language, text) of every fenced shell or Python block."""
    text = README.read_text(encoding="utf-8")
    found = []
    for match in re.finditer(r"```(\w*)\n(.*?)```", text, flags=re.S):
        if match.group(1) in ("bash", "sh", "python"):
            heading = re.findall(r"^#+ .*$", text[: match.start()], flags=re.M)[-1]
            found.append((heading, match.group(1), match.group(2)))
    return found


def _block(start: str) -> str:
    matches = [body for _, _, body in _all_blocks() if body.startswith(start)]
    assert len(matches) == 1, f"{len(matches)} README blocks start with {start!r}"
    return matches[0]


def _blocks(language: str, after: str) -> list[str]:
    """Fenced code blocks of `language` in the README section that starts with heading `after`."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index(after):]
    section = section[: section.find("\n## ", len(after))]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def _shell(script: str, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    """`script` in bash (-euo pipefail) with this environment's `lorafit` first on the PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_every_readme_block_is_run_checked_or_says_why_not():
    unknown = [body.splitlines()[0] for _, _, body in _all_blocks()
               if not any(body.startswith(start) for start in BLOCKS)]
    assert not unknown, f"README blocks this test does not know (add them to BLOCKS): {unknown}"
    for start, verdict in BLOCKS.items():
        _block(start)  # each entry names exactly one block
        assert verdict.startswith(("run: test_", "check: test_", "leave: "))
        if not verdict.startswith("leave: "):
            assert f"def {verdict.split(': ')[1].split()[0]}(" in Path(__file__).read_text(encoding="utf-8")


def test_library_example_runs_and_prints_the_report_it_shows(tmp_path, monkeypatch, capsys):
    code = _block("import torch\nfrom transformers import LlamaConfig")
    shown = re.search(r"print\(lorafit\.report\(model\)\)\s+# (.*)", code).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert shown in capsys.readouterr().out
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()


def test_fused_slices_example_builds_its_config():
    import lorafit

    namespace = {"lorafit": lorafit}
    exec(compile(_block("qkv = lorafit.FusedSlices"), "README.md", "exec"), namespace)
    assert namespace["cfg"].fused_slices["query_key_value"].adapt == ("q", "v")


def test_inspect_example_prints_the_seeds_figures(monkeypatch, capsys):
    command, comment = _block("lorafit inspect --model-config").strip().splitlines()
    monkeypatch.chdir(REPO)
    assert main(command.split()[1:]) == 0
    expected = comment.removeprefix("# ... ")
    assert expected in capsys.readouterr().out
    assert "4,194,304" in expected and "6,738,415,616" in expected and "0.062%" in expected


def test_the_synopsis_names_only_real_flags():
    """The `lorafit <command> [--flag ...]` synopsis: every flag it shows is a flag of that command."""
    import dataclasses

    from lorafit.cli.main import COMMANDS, _command

    synopsis = _block("lorafit train [--model PATH]")
    commands = re.split(r"^lorafit (\w+)", synopsis, flags=re.M)[1:]
    assert [commands[i] for i in range(0, len(commands), 2)] == list(COMMANDS)  # every command, in order
    for name, text in zip(commands[0::2], commands[1::2]):
        fields = {f.name for f in dataclasses.fields(_command(name)[0])}
        shown = {flag[2:].replace("-", "_") for flag in re.findall(r"--[a-z][a-z0-9-]*", text.split("#")[0])}
        assert shown, name
        assert shown <= fields, f"lorafit {name}: {sorted(shown - fields)} are not its flags"


def test_estimate_example_plans_the_seeds_run(capsys, monkeypatch):
    """The README's `lorafit estimate` line for the seed's run prints the weights and the verdict it quotes."""
    block = _block("lorafit estimate --model-config")
    command = " ".join(line.split("#")[0].rstrip(" \\") for line in block.splitlines()[0:2]).split()[1:]
    monkeypatch.chdir(REPO)
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "weights, float16" in out and "12,852.5 MiB" in out
    assert "verdict: fits in 32.00 GiB" in out
    readme = README.read_text(encoding="utf-8")
    total = re.search(r"total\s+[\d,.]+ MiB \(([\d.]+) GiB\)", out).group(1)
    assert f"total {total} GiB of 32: fits" in readme  # the fp16 column, as the command plans it


@pytest.mark.slow
def test_estimate_table_example_plans_the_default_model(capsys):
    command = _block("lorafit estimate --model-config").splitlines()[2].split("#")[0].split()
    assert command[:3] == ["lorafit", "estimate", "--table"]
    assert main(command[1:]) == 0
    assert "total GiB by length (rows) and batch size (columns)" in capsys.readouterr().out


@pytest.mark.slow
def test_own_data_example_trains_on_the_embedded_model(tmp_path):
    block = _block("printf '%s\\n' '{\"instruction\"").replace("/tmp/", f"{tmp_path}/")
    done = _shell(block, tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "tiny-run" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_parquet_columns_example_trains_on_the_embedded_model(tmp_path):
    done = _shell(_block("python - <<'PY'\nimport pyarrow"), tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "data: sums.parquet (parquet, 1 file)" in done.stdout
    assert (tmp_path / "runs" / "sums" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_export_example_writes_both_files_from_a_trained_run(trained_default_run, tmp_path):
    """The `lorafit export` lines of "Run it in llama.cpp / Ollama", on the default job's run (trained once for
    the slow tests: its first line); llama.cpp runs what they write in tests/formats/test_in_llama_cpp.py."""
    lines = _block("lorafit train --output runs/dates").strip().splitlines()
    assert lines[0].split("#")[0].split() == ["lorafit", "train", "--output", "runs/dates"]
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "dates").symlink_to(trained_default_run)
    done = _shell("\n".join(lines[1:]), tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "dates-lora.gguf").stat().st_size < 2**20 < (tmp_path / "dates.gguf").stat().st_size


@pytest.mark.slow
def test_generate_example_answers_with_the_trained_adapter(trained_default_run, tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "dates").symlink_to(trained_default_run)
    done = _shell(_block("lorafit generate --adapter runs/dates"), tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "2021-03-05"  # the trained adapter answers the README's question


# The one change the torchrun test makes: a short run instead of one epoch of the user's data.
STEPS = ["--steps", "2"]


@pytest.mark.slow
def test_torchrun_examples_run_as_written(tmp_path):
    """`lorafit train --nproc 4`, `torchrun --nproc-per-node 4 -m lorafit train` and the fsdp line, on this
    machine's CPU (gloo), with a small train.jsonl and two steps each."""
    lines = [line.split("#")[0].strip() for line in _block("lorafit train --nproc 4").splitlines()[:3]]
    assert lines[1].startswith("torchrun --nproc-per-node 4 -m lorafit train")
    records = [f'{{"instruction": "Say {i}", "output": "{i}"}}' for i in range(40)]
    (tmp_path / "train.jsonl").write_text("\n".join(records) + "\n")
    for index, line in enumerate(lines):
        run = f"{line} {' '.join(STEPS)} --eval-examples 0 --output runs/{index}"
        done = _shell(run, tmp_path, timeout=900)
        assert done.returncode == 0, f"{run}\n{done.stderr[-3000:]}"
        assert (tmp_path / "runs" / str(index) / "adapter" / "adapter_model.safetensors").exists()
