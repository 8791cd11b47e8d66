"""The `lorafit` command end to end on a tiny model folder: train, eval, generate, merge, inspect."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorafit.cli.main import main
from lorafit.data.tasks import generate_date_task


@pytest.fixture(scope="module")
def date_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "dates.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in generate_date_task(40, seed=1)))
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_chat_model, date_data):
    run = tmp_path_factory.mktemp("runs") / "run"
    code = main(["train", "--model", str(tiny_chat_model), "--data", str(date_data), "--steps", "6",
                 "--batch-size", "4", "--lr", "1e-2", "--save-every", "3", "--eval-examples", "4",
                 "--max-new-tokens", "10", "--eval-every", "3", "--output", str(run)])  # a date is 10 byte tokens
    assert code == 0
    return run


def test_train_writes_adapter_log_plot_metrics_and_config(trained_run, capsys):
    assert (trained_run / "adapter" / "adapter_model.safetensors").is_file()
    assert (trained_run / "adapter" / "adapter_config.json").is_file()
    assert (trained_run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    log = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert "eval" in log[2] and "eval" in log[5]
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    assert set(metrics["after"]) == {"loss", "perplexity", "exact_match"}
    resolved = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert resolved["steps"] == 6 and resolved["lr"] == 1e-2 and resolved["warmup_steps"] == 0
    # no --dtype given: the machine's default, recorded resolved so that a resume keeps it
    from lorafit.models.dtypes import default_dtype

    assert resolved["dtype"] == str(default_dtype(torch.device("cpu"))).removeprefix("torch.")


def test_existing_output_is_refused_and_resume_continues(trained_run, tiny_chat_model, date_data, capsys):
    args = ["train", "--model", str(tiny_chat_model), "--data", str(date_data), "--steps", "6", "--batch-size",
            "4", "--lr", "1e-2", "--output", str(trained_run)]
    assert main(args) == 1
    assert f"exists and is not empty; pass --overwrite to replace the run there, or --resume {trained_run}" in \
        capsys.readouterr().err
    before = load_file(trained_run / "adapter" / "adapter_model.safetensors")
    assert main(["train", "--model", str(tiny_chat_model), "--data", str(date_data), "--steps", "6",
                 "--batch-size", "4", "--lr", "1e-2", "--eval-examples", "4", "--max-new-tokens", "4",
                 "--resume", str(trained_run / "checkpoints" / "step-000003")]) == 0
    # the resumed run redoes steps 4-6 from the step-3 checkpoint and ends at the same adapter
    after = load_file(trained_run / "adapter" / "adapter_model.safetensors")
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), (key, (after[key] - value).abs().max())


def test_merge_equals_base_plus_adapter(trained_run, tiny_chat_model, tmp_path):
    import lorafit

    merged_dir = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_chat_model), "--adapter", str(trained_run / "adapter"),
                 "--output", str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = lorafit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_chat_model).eval(), trained_run / "adapter")
    ids = torch.randint(0, 258, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (merged(ids).logits - base(ids).logits).abs().max() <= 1e-5
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert main(["merge", "--model", str(tiny_chat_model), "--adapter", str(trained_run / "adapter"),
                 "--output", str(merged_dir)]) == 1  # exists


def test_eval_prints_json_metrics(trained_run, tiny_chat_model, date_data, capsys):
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_chat_model), "--adapter", str(trained_run / "adapter"),
                 "--data", str(date_data), "--json", "--eval-examples", "3", "--max-new-tokens", "10"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(metrics) == {"loss", "perplexity", "exact_match", "examples", "left_out", "data", "exact_match_examples"}
    assert metrics["data"] == f"{date_data} (jsonl, 1 file)" and 0 <= metrics["exact_match_examples"] <= 3
    assert metrics["examples"] == 3 and metrics["left_out"] == 0  # --eval-examples caps the loss too
    assert 0 < metrics["loss"] < 10 and abs(metrics["perplexity"] - 2.718281828 ** metrics["loss"]) < 1e-3
    assert 0 <= metrics["exact_match"] <= 1


def test_generate_streams_a_reply(trained_run, tiny_chat_model, capsys):
    assert main(["generate", "--model", str(tiny_chat_model), "--adapter", str(trained_run / "adapter"),
                 "--max-new-tokens", "5", "March 5, 2021"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_yaml_config_sets_defaults_that_flags_override(tmp_path, tiny_chat_model, date_data):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_chat_model), "data": str(date_data), "steps": 2,
                                      "batch-size": 4, "lr": 0.01, "r": 4, "eval_examples": 2,
                                      "max_new_tokens": 2}))
    assert main(["train", "--config", str(config), "--r", "2", "--output", str(tmp_path / "run")]) == 0
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["r"] == 2 and resolved["steps"] == 2 and resolved["batch_size"] == 4


@pytest.mark.parametrize("content, message", [
    ({"stepz": 3}, "unknown setting 'stepz' (did you mean steps?)"),
    ({"steps": "many"}, "steps = 'many' does not fit its type"),
    ("steps: [1,\n", "line 2: invalid YAML"),
    ([1, 2], "expected a mapping of settings, got list"),
])
def test_bad_yaml_is_one_clear_line(tmp_path, capsys, content, message):
    config = tmp_path / "run.yaml"
    config.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    assert main(["train", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert message in err and str(config) in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["train", "--r", "0"], "--r must be >= 1"),
    (["train", "--lr", "-1"], "--lr must be a finite number > 0"),
    (["train", "--steps", "0"], "--steps must be > 0"),
    (["train", "--model", "/nonexistent/model"], "/nonexistent/model"),
    (["train", "--data", "/nonexistent/data.jsonl"], "/nonexistent/data.jsonl"),
])
def test_bad_arguments_exit_non_zero_with_one_line(capsys, args, message):
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["trian"], "unknown command 'trian' (did you mean train?)"),
    (["train", "--stepz", "3"], "Unrecognized options: --stepz 3 (did you mean --steps?); see lorafit train --help"),
    (["train", "--steps", "abc"], "Error parsing --steps"),
    (["train", "--steps"], "Missing value for argument '--steps'"),
    (["eval", "--jsn"], "(did you mean --json?)"),
])
def test_a_command_line_that_does_not_parse_is_one_line_and_exit_2(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "╭" not in err, err


def test_yaml_float_without_a_dot_and_a_folder_as_config_explain_themselves(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 2e-4\n")  # YAML 1.1 reads this as a string
    assert main(["train", "--config", str(config)]) == 1
    assert "YAML reads 2e-4 as text: write it with a dot, e.g. lr: 0.0002" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path)]) == 1
    assert f"--config {tmp_path} is a directory" in capsys.readouterr().err


def test_inspect_counts_the_seed_llama_7b_figures(capsys):
    assert main(["inspect", "--model-config", "tests/fixtures/llama-7b-config.json", "--targets", "q_proj,v_proj"]) == 0
    out = capsys.readouterr().out
    assert "trainable 4,194,304 / 6,742,609,920 (0.062%) · base 6,738,415,616" in out
    assert "q_proj              Linear      4096→4096           32  yes" in out


@pytest.mark.parametrize("flags", [
    ["--method", "dora"], ["--method", "ia3"], ["--method", "bitfit", "--targets", "all-linear", "--add-missing-bias"],
    ["--init", "pissa"], ["--lora-plus-ratio", "16"], ["--use-rslora", "--targets", "all-linear"],
], ids=["dora", "ia3", "bitfit", "pissa", "lora+", "rslora"])
def test_every_method_trains_saves_and_merges_from_the_command_line(tmp_path, tiny_chat_model, date_data, flags):
    import lorafit

    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_chat_model), "--data", str(date_data), "--steps", "3",
                 "--batch-size", "4", "--lr", "1e-2", "--eval-examples", "2", "--max-new-tokens", "2",
                 "--output", str(run), *flags]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    assert main(["merge", "--model", str(tiny_chat_model), "--adapter", str(run / "adapter"),
                 "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapted = lorafit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_chat_model).eval(), run / "adapter")
    ids = torch.randint(0, 258, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (merged(ids).logits - adapted(ids).logits).abs().max() <= 1e-4


def test_bitfit_on_a_model_without_biases_explains_the_opt_in(tiny_chat_model, date_data, capsys):
    assert main(["train", "--model", str(tiny_chat_model), "--data", str(date_data), "--method", "bitfit"]) == 1
    err = capsys.readouterr().err
    assert "LlamaForCausalLM has no bias terms" in err and "--add-missing-bias" in err


def test_merge_refuses_weights_the_config_cannot_describe(tiny_chat_model, tmp_path, capsys):
    import lorafit

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    lorafit.attach(model, lorafit.BitFitConfig(target_modules=["lm_head"], add_missing_bias=True))
    lorafit.save_adapter(model, tmp_path / "adapter")
    assert main(["merge", "--model", str(tiny_chat_model), "--adapter", str(tmp_path / "adapter"),
                 "--output", str(tmp_path / "merged")]) == 1
    assert "weights its config cannot describe (e.g. lm_head.bias" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_epochs_set_the_steps_and_eval_data_is_the_held_out_set(tmp_path, tiny_chat_model, date_data, capsys):
    held_out = tmp_path / "held.jsonl"
    held_out.write_text("".join(json.dumps({"messages": m}) + "\n" for m in generate_date_task(5, seed=7)))
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_chat_model), "--data", str(date_data), "--eval-data", str(held_out),
                 "--epochs", "0.5", "--batch-size", "4", "--eval-examples", "2", "--max-new-tokens", "2",
                 "--output", str(run)]) == 0
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["steps"] == 5  # 40 training examples (all of --data) / batch 4 = 10 steps per epoch
    assert resolved["warmup_steps"] == 0  # 5% of 5 steps, rounded
    # the held-out loss is over --eval-data's first --eval-examples: the same figure `lorafit eval` gives on that file
    metrics = json.loads((run / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_chat_model), "--adapter", str(run / "adapter"),
                 "--data", str(held_out), "--json", "--eval-examples", "2", "--max-new-tokens", "2"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["examples"] == 2 and metrics["held_out_examples"] == 2
    assert evaluated["loss"] == pytest.approx(metrics["after"]["loss"], rel=1e-5)


def test_compile_without_a_cxx_compiler_fails_before_the_run_folder_is_made(tmp_path, tiny_chat_model, date_data,
                                                                            capsys, monkeypatch):
    monkeypatch.setattr("lorafit.train.setup.shutil.which", lambda name: None)
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_chat_model), "--data", str(date_data), "--steps", "2",
                 "--compile", "--output", str(run)]) == 1
    assert "--compile on CPU needs a C++ compiler" in capsys.readouterr().err
    assert not run.exists()


# -- how tyro parses the commands ---------------------------------------------------------------------------
def test_no_command_prints_every_command_and_exits_2(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in ("train", "eval", "generate", "merge", "inspect")) and "Exit codes" in out
    assert main(["--help"]) == 0


def test_targets_and_layers_are_lists_with_spaces_or_commas(capsys):
    seed_config = "tests/fixtures/llama-7b-config.json"

    def counts(*flags):
        assert main(["inspect", "--model-config", seed_config, *flags]) == 0
        return capsys.readouterr().out.strip().splitlines()[-1]  # "LoRA r=8 on N modules: trainable ..."

    assert counts("--targets", "q_proj", "v_proj") == counts("--targets", "q_proj,v_proj")
    assert "trainable 4,194,304 / " in counts("--targets", "q_proj", "v_proj")  # the seed's figure
    # r=8 on q_proj (4096→4096) of blocks 0 and 1: 2 × (8·4096 + 4096·8) = 131,072
    assert "LoRA r=8 on 2 modules: trainable 131,072 / " in counts("--targets", "q_proj", "--layers", "0", "1")


@pytest.mark.parametrize("args, message", [
    (["eval", "--dtype", "float8"], "--dtype 'float8' is unknown (did you mean float32?); use "),
    (["train", "--init", "pisa"], "--init 'pisa' is unknown (did you mean pissa?); use "),
])
def test_a_value_outside_a_flags_choices_names_the_closest_and_exits_1(capsys, args, message):
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "╭" not in err, err


@pytest.mark.parametrize("command, hint", [("estimate", "give it as --model-config"),
                                           ("inspect", "give it as --model-config"),
                                           ("eval", "give it as --model")])
def test_a_models_config_given_as_settings_points_to_the_flag_for_it(tmp_path, capsys, command, hint):
    config = tmp_path / "config.json"
    config.write_text(Path("tests/fixtures/llama-7b-config.json").read_text())
    assert main([command, "--config", str(config)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lorafit {command}: error: --config {config} is a model's config (it has model_type)")
    assert hint in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("command", ["train", "eval", "generate", "merge", "export", "inspect", "estimate", "cache"])
def test_every_commands_help_page_names_config_and_debug(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    page = " ".join(capsys.readouterr().out.split())  # tyro wraps lines
    assert "--config FILE.yaml sets these flags from a file" in page and "--debug shows the traceback" in page
