"""One vocabulary across commands: the same device options everywhere, every default shown in
``--help``, ``bbadapt list`` never cutting a name, and usage errors as one line like every error.

These run the real command line in subprocesses (``--help`` and argument errors never import
mxnet, so they are quick), except the terminal rendering of ``list``, which needs a console
that pretends to be a narrow terminal.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import os
import re
import subprocess
import sys

import pytest

from bbadapt.engines.gluon.options import EvaluateOptions, TrainConfig

COMMANDS = ["convert", "check", "export", "list", "formats", "inspect", "train", "evaluate"]
WIDE = {**os.environ, "COLUMNS": "400", "TERM": "dumb"}


def cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bbadapt.cli", *map(str, args)], capture_output=True, text=True,
                          env=env or os.environ)


def options_of(help_text: str) -> dict[str, str]:
    """{--option: its whole row} from typer's help box (rows start with the box edge)."""
    rows = {}
    for line in help_text.splitlines():
        m = re.match(r"^│\s+(?:\*\s+)?(--[a-z0-9-]+)", line)
        if m:
            rows[m.group(1)] = line
    return rows


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    return {c: cli(c, "--help", env=WIDE).stdout for c in COMMANDS}


def test_every_option_of_every_command_shows_its_default(helps):
    for command, text in helps.items():
        rows = options_of(text)
        assert rows, (command, text)
        for option, row in rows.items():
            if option == "--help":
                continue
            assert "[default:" in row or "[required]" in row, f"bbadapt {command} {option}: {row.strip()}"


def test_the_defaults_the_issue_named_are_shown(helps):
    convert = options_of(helps["convert"])
    assert "[default: (fused; affine with --detector)]" in convert["--bn"]
    assert "[default: (out/MODEL)]" in convert["--out"]


def test_train_and_evaluate_defaults_are_the_dataclass_fields(helps):
    """Each default is written once (TrainConfig / EvaluateOptions) and --help shows that value."""
    train = options_of(helps["train"])
    config = TrainConfig()
    assert config.batch_size is None and "[default: (one image per device per worker)]" in train["--batch-size"]
    for field, option in [("epochs", "--epochs"), ("short_side", "--short-side"),
                          ("max_size", "--max-size"), ("checkpoint_every", "--checkpoint-every"),
                          ("val_interval", "--val-interval"), ("log_interval", "--log-interval"), ("seed", "--seed"),
                          ("num_workers", "--workers"), ("train_split", "--train-split"), ("val_split", "--val-split")]:
        assert f"[default: {getattr(config, field)}]" in train[option], (option, train[option])
    assert "GluonCV's recipe" in train["--lr"] and "random backbone weights" in train["--warmup"]
    evaluate = options_of(helps["evaluate"])
    options = EvaluateOptions()
    assert f"[default: {options.metric}]" in evaluate["--metric"]
    assert f"[default: {options.split}]" in evaluate["--split"]


def test_train_and_evaluate_take_the_same_device_options(helps):
    train, evaluate = options_of(helps["train"]), options_of(helps["evaluate"])
    for option in ("--gpus", "--cpu"):
        assert option in train and option in evaluate
    assert "--gpu" not in evaluate  # the old, different spelling is gone
    # in Python too: the same name, the same string syntax
    from bbadapt.engines.gluon.evaluate import evaluate as evaluate_fn
    from bbadapt.engines.gluon.train import train as train_fn

    for fn in (train_fn, evaluate_fn):
        assert "gpus" in inspect.signature(fn).parameters
    assert len(inspect.signature(train_fn).parameters) <= 8


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_gpus_and_cpu_together_are_one_usage_line(command, tmp_path):
    result = cli(command, tmp_path, "--dataset", f"voc:{tmp_path}", "--gpus", "0", "--cpu")
    assert result.returncode == 2
    assert result.stderr.strip() == "bbadapt: error: --gpus and --cpu exclude each other"


def test_evaluate_asks_mxnet_for_the_gpu_it_is_given(tmp_path):
    """Where mxnet has no GPU (this CPU build), --gpus 0 on evaluate is the same one line as on train."""
    import mxnet as mx

    n = mx.context.num_gpus()
    result = cli("evaluate", tmp_path, "--dataset", f"voc:{tmp_path}", "--gpus", str(n))
    assert result.returncode == 2
    line = result.stderr.strip()
    assert line.startswith("bbadapt: error: ") and "\n" not in line
    assert ("this mxnet sees no GPU" in line) if n == 0 else (f"mxnet sees {n} GPU(s)" in line)


def test_train_config_and_cli_options_stay_in_step():
    """Every TrainConfig field a user sets has exactly one CLI option (devices are recorded, dataset is positional)."""
    from bbadapt import cli as cli_module

    params = set(inspect.signature(cli_module.train_cmd).parameters)
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"devices", "momentum", "wd", "lr_decay",
                                                                    "warmup_factor", "flip_p"}
    assert fields <= params, fields - params
    assert {f.name for f in dataclasses.fields(EvaluateOptions)} <= set(inspect.signature(cli_module.evaluate_cmd).parameters)


# --------------------------------------------------------------------------- list


def test_list_piped_is_one_model_a_line_tab_separated_with_whole_names():
    from bbadapt.core.zoo import list_models

    result = cli("list", "--all")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [m.name for m in list_models()]
    assert all(len(line.split("\t")) == 5 for line in lines)
    assert "cifar_resnext29_32x4d\tcifar-resnext\tcifar\tgluoncv\tgeneric (stretch)" in lines
    assert not re.search(r"[│┃━─…]", result.stdout)  # no table drawing, nothing cut


def test_list_on_a_narrow_terminal_never_cuts_a_model_name(monkeypatch):
    from rich.console import Console

    from bbadapt import cli as cli_module
    from bbadapt.core.zoo import list_models

    screen = io.StringIO()
    monkeypatch.setattr(cli_module, "out_console", Console(file=screen, force_terminal=True, width=50, color_system=None))
    cli_module.list_models(all_models=True)
    shown = screen.getvalue()
    assert "┃" in shown  # a table, on a terminal
    for model in list_models():
        assert re.search(rf"│ {re.escape(model.name)}\s", shown), model.name


# --------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("args, says", [
    (["train", "DIR", "--dataset", "voc:x", "--frobnicate"], "No such option: --frobnicate"),
    (["convert", "resnet18_v1", "--fold", "diagonal"], "Invalid value for '--fold'"),
    (["train", "DIR"], "Missing option '--dataset'"),
    (["evaluate"], "Missing argument 'DIRECTORY'"),
    (["transmogrify"], "No such command 'transmogrify'"),
    (["train", "DIR", "--dataset", "voc:x", "--epochs", "zero"], "Invalid value for '--epochs'"),
], ids=["unknown-option", "bad-choice", "missing-option", "missing-argument", "unknown-command", "not-a-number"])
def test_a_usage_error_is_one_line_with_where_to_look(args, says):
    result = cli(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bbadapt: error: ") and says.lower() in lines[0].lower(), lines[0]
    assert re.search(r"\(see `bbadapt( [a-z]+)? --help`\)$", lines[0]), lines[0]


def test_bare_bbadapt_prints_the_help():
    result = cli()
    assert result.returncode == 0 and "Usage: bbadapt" in result.stdout and "convert" in result.stdout
