"""The ``thrifty`` command line, called in-process: output and exit codes (no training runs)."""

from __future__ import annotations

import json
import logging

import pytest
import yaml

from thrifty.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main

SUBCOMMANDS = ["list", "show-config", "run", "reproduce", "report", "score"]


@pytest.fixture(autouse=True)
def _isolate(monkeypatch):
    """main() reconfigures the root logger; put it back so other tests are unaffected."""
    monkeypatch.delenv("THRIFTY_CONFIG_DIR", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_list_mentions_glam(capsys):
    assert main(["list"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "glam" in out
    assert "ready" in out
    assert "planned" in out


def test_show_config_prints_yaml_with_override_after_options(capsys):
    assert main(["show-config", "glam", "--preset", "smoke", "max_steps=7"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "max_steps: 7" in out.splitlines()
    cfg = yaml.safe_load(out)
    assert cfg["max_steps"] == 7
    assert cfg["preset"] == "smoke"
    assert cfg["model"]["dim"] == 32  # from smoke.yaml


def test_show_config_overrides_on_both_sides_of_options(capsys):
    assert main(["show-config", "glam", "max_steps=9", "--preset", "smoke", "model.dim=64"]) == EXIT_OK
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["max_steps"] == 9
    assert cfg["model"]["dim"] == 64
    assert cfg["preset"] == "smoke"


def test_show_config_default_preset_is_quick(capsys):
    assert main(["show-config", "glam"]) == EXIT_OK
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["preset"] == "quick"
    assert cfg["model"]["dim"] == 128


@pytest.mark.parametrize("cmd", [["show-config", "glm"], ["run", "glm", "--preset", "smoke"], ["reproduce", "glm"]])
def test_unknown_recipe_exits_2_and_lists_known(capsys, cmd):
    assert main(cmd) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "'glm'" in err
    assert "glam" in err
    assert "squid" in err
    assert "Traceback" not in err


def test_planned_recipe_exits_2(capsys):
    assert main(["show-config", "mt_transunet"]) == EXIT_USAGE
    assert "not implemented" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["max_step", "moe.num_expert"])
def test_bad_key_exits_2_naming_key(capsys, key):
    assert main(["show-config", "glam", "--preset", "smoke", f"{key}=3"]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert f"'{key}'" in captured.err
    assert captured.out == ""


def test_bad_key_in_run_fails_before_training(capsys, tmp_path):
    assert main(["run", "glam", "--preset", "smoke", f"out_dir={tmp_path}", "max_step=3"]) == EXIT_USAGE
    assert "'max_step'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_bad_value_exits_2_naming_key_and_type(capsys):
    assert main(["show-config", "glam", "--preset", "smoke", "max_steps=abc"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "'max_steps'" in err
    assert "int" in err


def test_section_replaced_by_scalar_exits_2(capsys):
    # a wrong-typed section is an invalid config like any other: exit 2 with a message, no traceback
    assert main(["show-config", "glam", "--preset", "smoke", "optim=3"]) == EXIT_USAGE
    assert "optim" in capsys.readouterr().err


def test_unknown_preset_exits_2_listing_presets(capsys):
    assert main(["show-config", "glam", "--preset", "gigantic"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "gigantic" in err
    assert "quick" in err
    assert "smoke" in err


def test_reproduce_with_unknown_budget_exits_2_without_traceback(capsys, tmp_path):
    # an invalid preset is an invalid config (exit 2), caught before any recipe starts
    assert main(["reproduce", "glam", "--budget", "quik", "--out-dir", str(tmp_path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "quik" in err
    assert "Traceback" not in err


def test_malformed_override_exits_2(capsys):
    assert main(["show-config", "glam", "max_steps"]) == EXIT_USAGE
    assert "key=value" in capsys.readouterr().err


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help_on_each_subcommand_exits_0(capsys, sub):
    with pytest.raises(SystemExit) as ei:
        main([sub, "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert f"thrifty {sub}" in out


def test_top_level_help_and_version_exit_0(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for sub in SUBCOMMANDS:
        assert sub in out
    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0
    assert "thrifty 0.1.0" in capsys.readouterr().out


def test_no_command_exits_2_with_help(capsys):
    assert main([]) == EXIT_USAGE
    assert "usage: thrifty" in capsys.readouterr().out


def test_report_without_results_exits_1(capsys, tmp_path):
    assert main(["report", str(tmp_path)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert str(tmp_path) in err
    assert "results.json" in err


def test_report_on_a_finished_run_writes_files(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    claim = {
        "id": "c1",
        "statement": "A < B",
        "paper_value": 1,
        "measured": -1.0,
        "ci95": [-2.0, -0.5],
        "direction": "less",
        "threshold": 0.0,
        "baseline": "B",
        "values": [-1.0, -1.5, -0.5],
        "seeds": [0, 1, 2],
        "preset": "smoke",
        "unit": "",
        "note": "",
        "holds": True,
    }
    (run / "results.json").write_text(json.dumps({"recipe": "glam", "preset": "smoke", "claims": [claim]}))
    out_dir = tmp_path / "rep"
    assert main(["report", str(run), "--out", str(out_dir)]) == EXIT_OK
    assert "report.html" in capsys.readouterr().out
    assert "1 of 1 claims hold" in (out_dir / "report.md").read_text()
    assert (out_dir / "report.html").is_file()


@pytest.mark.parametrize(
    "argv",
    [
        ["list", "--bogus"],
        ["show-config", "glam", "--bogus"],
        ["--bogus"],
        ["list", "x=1"],
        ["show-config", "glam", "--preset", "smoke", "max_steps=7", "stray"],
    ],
)
def test_unrecognized_arguments_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 2
    assert "error" in capsys.readouterr().err


def test_unknown_subcommand_exits_2(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["frobnicate"])
    assert ei.value.code == 2
