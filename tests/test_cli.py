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


@pytest.fixture
def planned_recipe(monkeypatch):
    """A registry with one more recipe that is planned but not implemented (every real recipe is ready now)."""
    from thrifty.core import registry

    recipe = registry.Recipe("planned_demo", "A planned recipe", "0000.00000", "none", None)
    monkeypatch.setattr(registry, "RECIPES", (*registry.RECIPES, recipe))
    return recipe


def test_list_mentions_glam(capsys):
    assert main(["list"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "glam" in out
    assert "pe_cad" in out
    assert "ready" in out


def test_list_marks_a_planned_recipe(capsys, planned_recipe):
    assert main(["list"]) == EXIT_OK
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "planned_demo" in line and "│" in line)
    assert "planned" in row and "ready" not in row


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


def test_planned_recipe_exits_2(capsys, planned_recipe):
    assert main(["show-config", "planned_demo"]) == EXIT_USAGE
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
    assert "1 of 1 claims of the fresh runs hold" in (out_dir / "report.md").read_text()
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


# --------------------------------------------------------------------------- claim presets and references


def test_list_never_cuts_recipe_or_preset_names(capsys, monkeypatch):
    import re

    from thrifty.core.config import available_presets
    from thrifty.core.registry import RECIPES

    monkeypatch.setenv("COLUMNS", "80")
    assert main(["list"]) == EXIT_OK
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    names = {r.name for r in RECIPES} | {p for r in RECIPES for p in available_presets(r.name)}
    assert {"glam", "cpu", "cpu_long", "cpu_short", "ablations", "zhanglab"} <= names
    for name in sorted(names):
        whole = re.compile(rf"(?<![\w…]){re.escape(name)}(?![\w…])")
        assert whole.search(out), f"{name!r} is not printed whole"
        assert not re.search(rf"{re.escape(name[: max(len(name) - 1, 1)])}…", out), f"{name!r} is cut"
    assert "…" not in out
    # each ready recipe's row names its claim preset
    rows = [line for line in lines if line.startswith("│ glam ")]
    assert len(rows) == 1
    assert "│ cpu " in rows[0]


def test_show_config_claim_preset_says_so_and_is_still_yaml(capsys):
    assert main(["show-config", "glam", "--preset", "cpu"]) == EXIT_OK
    out = capsys.readouterr().out
    first, *rest = out.splitlines()
    assert first.startswith("#")
    assert "CLAIM PRESET" in first
    cfg = yaml.safe_load("\n".join(rest))
    assert cfg["preset"] == "cpu"
    assert len(cfg["seeds"]) == 5
    assert yaml.safe_load(out) == cfg  # the first line is a YAML comment


def test_show_config_other_preset_names_the_claim_preset(capsys):
    from thrifty.core.registry import get

    assert get("glam").claim_preset == "cpu"
    assert main(["show-config", "glam", "--preset", "quick"]) == EXIT_OK
    out = capsys.readouterr().out
    first, *rest = out.splitlines()
    assert first.startswith("#")
    assert "CLAIM PRESET" not in first
    assert "claim preset is cpu" in first
    assert yaml.safe_load("\n".join(rest))["preset"] == "quick"


@pytest.mark.parametrize("budget", ["claim", "cpu"])
def test_reproduce_claim_budget_runs_each_recipes_claim_preset(capsys, monkeypatch, tmp_path, budget):
    from thrifty.core import registry

    calls = []

    def fake_run_recipe(recipe, preset, overrides):
        calls.append((recipe, preset, list(overrides)))
        run_dir = tmp_path / "runs" / recipe / preset
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps({"recipe": recipe, "preset": preset, "claims": []}))
        return {"run_dir": str(run_dir)}

    monkeypatch.setattr("thrifty.cli.run_recipe", fake_run_recipe)
    monkeypatch.setenv("THRIFTY_DOCS_DIR", str(tmp_path / "no-docs"))
    out_dir = tmp_path / "runs"
    assert main(["reproduce", "--budget", budget, "--out-dir", str(out_dir)]) == EXIT_OK
    from thrifty.core.config import available_presets

    ready = registry.names(ready_only=True)
    with_claim = [n for n in ready if registry.get(n).claim_preset is not None]
    assert with_claim, "at least one recipe has a pre-registered claim preset"
    with_cpu = [n for n in ready if n in with_claim or "cpu" in available_presets(n)]
    # `claim` runs only pre-registered claim presets; `cpu` also runs the others' cpu presets
    expected = [(n, registry.get(n).claim_preset or "cpu") for n in (with_claim if budget == "claim" else with_cpu)]
    assert [(r, p) for r, p, _ in calls] == expected
    for _, preset, overrides in calls:
        assert f"run_name={preset}" in overrides
        assert f"out_dir={out_dir}" in overrides
    md = (out_dir / "report" / "report.md").read_text()
    for name, _ in expected:
        claim_preset = registry.get(name).claim_preset
        assert (f"no reference yet (claim preset {claim_preset})" if claim_preset else "no claim preset yet") in md
    assert "report.html" in capsys.readouterr().out


def test_reproduce_named_recipe_at_claim_budget(monkeypatch, tmp_path):
    calls = []

    def fake_run_recipe(recipe, preset, overrides):
        calls.append((recipe, preset))
        run_dir = tmp_path / recipe
        run_dir.mkdir()
        (run_dir / "results.json").write_text(json.dumps({"recipe": recipe, "preset": preset, "claims": []}))
        return {"run_dir": str(run_dir)}

    monkeypatch.setattr("thrifty.cli.run_recipe", fake_run_recipe)
    monkeypatch.setenv("THRIFTY_DOCS_DIR", str(tmp_path / "no-docs"))
    assert main(["reproduce", "glam", "--budget", "claim", "--out-dir", str(tmp_path / "out")]) == EXIT_OK
    assert calls == [("glam", "cpu")]


def test_reference_check_passes_on_the_repository(capsys, monkeypatch):
    monkeypatch.delenv("THRIFTY_DOCS_DIR", raising=False)
    assert main(["reference", "--check"]) == EXIT_OK
    captured = capsys.readouterr()
    assert "reference(s) checked, 0 problem(s)" in captured.out
    assert captured.err == ""


@pytest.mark.parametrize("argv", [["reference"], ["reference", "some/run", "--check"]])
def test_reference_needs_exactly_one_of_run_dir_or_check(capsys, argv):
    assert main(argv) == EXIT_USAGE
    assert "RUN_DIR or --check" in capsys.readouterr().err


def test_reference_on_dir_without_results_exits_1(capsys, tmp_path):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    assert main(["reference", str(empty), "--docs-dir", str(tmp_path / "docs")]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert str(empty) in err
    assert "results.json" in err
    assert "Traceback" not in err
    assert not (tmp_path / "docs").exists()


def _claim_preset_run(tmp_path, preset="cpu"):
    from thrifty.core.claims import paired_claim
    from thrifty.core.config import to_dict
    from thrifty.core.registry import load_config

    seeds = [100, 101, 102, 103, 104]
    claim = paired_claim(
        id="moe_beats_dense_active",
        statement="MoE below dense-active",
        a={s: 2.0 + 0.01 * i for i, s in enumerate(seeds)},
        b={s: 3.0 for s in seeds},
        direction="less",
        paper_value="yes",
        preset=preset,
        baseline="dense-active",
    )
    run = tmp_path / "run"
    run.mkdir()
    results = {
        "recipe": "glam",
        "preset": preset,
        "created": "2026-01-15 10:20:30",
        "claims": [claim.to_dict()],
        "figures": [],
        "environment": {"commit": "a" * 40, "dirty": False, "processor": "cpu", "threads": 2},
        "cost": {"wall_time_s": 60.0, "peak_rss_mb": 100.0},
        "config": {**to_dict(load_config("glam", "cpu")[1]), "out_dir": "elsewhere", "num_threads": 1},
    }
    (run / "results.json").write_text(json.dumps(results))
    return run


def test_reference_refuses_a_run_with_overrides(capsys, tmp_path):
    """A claim-preset run whose settings differ from the committed preset (e.g. max_steps=10) is not a reference."""
    run = _claim_preset_run(tmp_path)
    results = json.loads((run / "results.json").read_text())
    results["config"]["max_steps"] = 10
    (run / "results.json").write_text(json.dumps(results))
    assert main(["reference", str(run), "--docs-dir", str(tmp_path / "docs")]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "max_steps" in err and "committed preset" in err
    assert not (tmp_path / "docs").exists()


def test_reference_publishes_then_check_passes(capsys, monkeypatch, tmp_path):
    docs = tmp_path / "docs"
    run = _claim_preset_run(tmp_path)
    assert main(["reference", str(run), "--docs-dir", str(docs)]) == EXIT_OK
    assert "reference:" in capsys.readouterr().out
    assert (docs / "glam" / "reference" / "results.json").is_file()
    assert len((docs / "glam" / "claims_log.md").read_text().splitlines()) == 7  # header (6 lines) + 1 run
    monkeypatch.setenv("THRIFTY_DOCS_DIR", str(docs))
    assert main(["reference", "--check"]) == EXIT_OK
    assert "1 reference(s) checked, 0 problem(s)" in capsys.readouterr().out


def test_reference_check_reports_tampered_reference(capsys, monkeypatch, tmp_path):
    docs = tmp_path / "docs"
    assert main(["reference", str(_claim_preset_run(tmp_path)), "--docs-dir", str(docs), "--no-log"]) == EXIT_OK
    assert not (docs / "glam" / "claims_log.md").exists()
    path = docs / "glam" / "reference" / "results.json"
    data = json.loads(path.read_text())
    data["claims"][0]["holds"] = False
    path.write_text(json.dumps(data))
    monkeypatch.setenv("THRIFTY_DOCS_DIR", str(docs))
    capsys.readouterr()
    assert main(["reference", "--check"]) == EXIT_FAILED
    captured = capsys.readouterr()
    assert "'moe_beats_dense_active'" in captured.err
    assert "1 problem(s)" in captured.out


def test_reference_of_another_preset_exits_1(capsys, tmp_path):
    run = _claim_preset_run(tmp_path, preset="quick")
    assert main(["reference", str(run), "--docs-dir", str(tmp_path / "docs")]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "'quick'" in err
    assert "'cpu'" in err


def test_run_claims_table_never_cuts_ids_or_numbers(capsys, monkeypatch):
    """The claims table `thrifty run` prints at 80 columns keeps every claim id whole and ellipsises nothing."""
    from thrifty.cli import _print_claims
    from thrifty.core.claims import paired_claim

    monkeypatch.setenv("COLUMNS", "80")
    long_id = "semantic_genesis_vs_models_genesis_ncs"
    claim = paired_claim(
        id=long_id,
        statement="s",
        a={0: 0.123456, 1: 0.2, 2: 0.31},
        b={0: 0.0, 1: 0.0, 2: 0.0},
        direction="greater",
        paper_value="p",
        preset="quick",
        baseline="b",
        unit="IoU points (a − b)",
    )
    _print_claims({"recipe": "genesis", "preset": "quick", "claims": [claim.to_dict()]})
    out = capsys.readouterr().out
    assert long_id in out
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= 80
