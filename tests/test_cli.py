"""The command line as a user meets it: one readable line and the right exit code for every mistake, help for
every flag, --version, pipes closed early, and imports that a user's own `models/` or `service/` cannot hijack."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from tuneserve import __version__
from tuneserve.cli import main
from tuneserve.parsers import build_parser
from support import shadowing_packages


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "/no/such/folder"], "error: data folder '/no/such/folder' does not exist"),
    (["train"], "error: --data DIR is required"),
    (["train", "--data", ".", "--epochs", "-1"], "error: epochs must be 0 (adaptive) or >= 1, got -1"),
    (["train", "--data", ".", "--time-budget", "20"], "error: time budget '20' is not a duration; give a number with a "
                                                      "unit: 90s, 20m, 1h30m, 1.5h"),
    (["train", "--data", ".", "--config", "missing.yaml"], "error: config file 'missing.yaml' does not exist"),
    (["train", "--data", "TINY", "--weights", "nothere.pth"], "error: --weights 'nothere.pth' is not a file"),
    (["evaluate", "no-such-model", "--data", "."], "error: model 'no-such-model' is not in the BentoML model store"),
    (["export", "nothing.pt"], "error: checkpoint 'nothing.pt' does not exist"),
    (["serve", "--model", "no-such-model:v1"], "error: model 'no-such-model:v1' is not in the BentoML model store"),
    (["serve", "--max-batch-size", "0"], "TUNESERVE_MAX_BATCH_SIZE=0 is out of range"),
    (["serve", "--port", "70000"], "error: --port must be in 1..65535, got 70000"),
    (["predict", "missing.jpg"], "error: no such image file: missing.jpg"),
])
def test_usage_errors_are_one_readable_line_and_exit_2(args, message, tmp_path, tiny_folder, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([str(tiny_folder) if a == "TINY" else a for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_argument_errors_exit_2(capsys):
    for args in (["train", "--data", ".", "--arch", "vgg"], ["serve", "--workers", "many"], ["nonsense"]):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
    assert "invalid choice: 'vgg'" in capsys.readouterr().err


def test_serve_takes_the_port_from_bentoml_port_when_no_flag(monkeypatch, capsys):
    monkeypatch.setenv("BENTOML_PORT", "eighty")
    assert main(["serve"]) == 2
    assert "BENTOML_PORT='eighty' is not a port number" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"tuneserve {__version__}"


def _parsers(parser: argparse.ArgumentParser, path: str = "tuneserve"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_flag_has_help_and_says_its_default_once():
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help, f"{path} {name} has no help text"
            shown = action.help % {"default": action.default} if "%(default)" in action.help else action.help
            assert shown.count("default") <= 1, f"{path} {name}: {shown}"
            assert "(default: )" not in shown, f"{path} {name}: {shown}"


def test_train_loader_workers_and_serve_workers_are_told_apart():
    parser = build_parser()
    assert parser.parse_args(["train", "--loader-workers", "3"]).loader_workers == 3
    assert parser.parse_args(["serve", "--workers", "2"]).workers == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--workers", "3"])


def test_timm_names_of_train_settings_are_aliases():
    parser = build_parser()
    args = parser.parse_args(["train", "--smoothing", "0.2", "--clip-grad", "2.5", "--init-from", "hym:v1"])
    assert (args.label_smoothing, args.grad_clip, args.init_from) == (0.2, 2.5, "hym:v1")
    assert parser.parse_args(["train", "--label-smoothing", "0.05"]).label_smoothing == 0.05


def test_cli_runs_from_a_folder_with_its_own_models_and_service_packages(tmp_path, model):
    folder = shadowing_packages(tmp_path / "project")
    r = subprocess.run([sys.executable, "-m", "tuneserve", "models", "--json"], cwd=folder, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(folder)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert model.tag in r.stdout


def test_a_closed_pipe_is_not_a_traceback(model):
    proc = subprocess.Popen([sys.executable, "-m", "tuneserve", "models", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written: `tuneserve models --json | head -0`
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err.decode()
    assert b"Traceback" not in err and b"BrokenPipeError" not in err


def test_models_add_builtin_registers_what_the_service_serves_by_default(model, capsys, monkeypatch):
    from tuneserve.models.store import ModelNotFoundError
    from tuneserve.service.plan import resolve_model

    assert main(["models", "add-builtin"]) == 0
    assert model.tag in capsys.readouterr().out
    assert resolve_model(None).tag == model.tag
    monkeypatch.setattr("tuneserve.service.plan.BUILTIN_NAME", "never-registered")
    with pytest.raises(ModelNotFoundError, match="tuneserve models add-builtin"):
        resolve_model(None)  # the service never exports a model itself: it names the command that does


@pytest.mark.parametrize("preset, expected", [(None, "True"), ("False", "False")])
def test_bentoml_usage_tracking_is_off_unless_the_user_chose(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "BENTOML_DO_NOT_TRACK"}
    if preset is not None:
        env["BENTOML_DO_NOT_TRACK"] = preset
    code = ("import tuneserve, os; from bentoml._internal.utils.analytics.usage_stats import do_not_track; "
            "print(os.environ['BENTOML_DO_NOT_TRACK'], do_not_track())")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == [expected, str(expected == "True")], r.stderr
