"""Run directories, resumption checks, JSONL metrics, atomic writes, progress, seeding and devices."""

from __future__ import annotations

import io
import json
import logging
import random
import sys

import numpy as np
import pytest
import torch
import yaml

from thrifty.core import distributed
from thrifty.core.config import ConfigError, load_config, preset_path, to_dict
from thrifty.core.run import (
    MetricsLog,
    atomic_write_text,
    data_root,
    main_first,
    new_summary,
    open_run,
    portable,
    prepare_run_dir,
    progress,
    resolve_device,
    run_dir_for,
    seed_everything,
    write_json,
)
from thrifty.methods.glam.config import GlamConfig


@pytest.fixture(autouse=True)
def _no_config_dir_env(monkeypatch):
    monkeypatch.delenv("THRIFTY_CONFIG_DIR", raising=False)


def _cfg(tmp_path, *overrides: str) -> GlamConfig:
    return load_config(GlamConfig, preset_path("glam", "smoke"), [f"out_dir={tmp_path}", "preset=smoke", *overrides])


# --------------------------------------------------------------------------- run directories


def test_open_run_prepares_the_directory_and_metrics_and_checks_the_batch(tmp_path):
    cfg = _cfg(tmp_path)
    info, run_dir, metrics = open_run("glam", cfg, batch_size=8)
    assert info.world_size == 1 and info.is_main
    assert run_dir == run_dir_for("glam", cfg) and (run_dir / "config.yaml").is_file()
    metrics.log({"step": 1, "loss": 2.0})
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"] == 2.0


def test_main_first_builds_once_per_process_and_returns_the_result():
    calls = []
    info = distributed.DistInfo()
    assert main_first(lambda: calls.append(1) or "built", info) == "built"
    assert calls == [1]


def test_new_summary_has_the_results_head_and_empty_lists(tmp_path):
    cfg = _cfg(tmp_path)
    s = new_summary("glam", {"arxiv": "x"}, cfg, tmp_path / "r", data={"n": 3})
    assert s["recipe"] == "glam" and s["preset"] == "smoke" and s["data"] == {"n": 3}
    assert s["claims"] == [] and s["tables"] == [] and s["figures"] == []
    assert list(s)[-3:] == ["claims", "tables", "figures"]


def test_run_dir_for_uses_run_name_or_preset(tmp_path):
    assert run_dir_for("glam", _cfg(tmp_path)) == tmp_path / "glam" / "smoke"
    assert run_dir_for("glam", _cfg(tmp_path, "run_name=exp1")) == tmp_path / "glam" / "exp1"


def test_prepare_run_dir_writes_resolved_config(tmp_path):
    cfg = _cfg(tmp_path, "max_steps=15")
    path = prepare_run_dir("glam", cfg)
    assert path == tmp_path / "glam" / "smoke"
    assert (path / "figures").is_dir()
    saved = yaml.safe_load((path / "config.yaml").read_text())
    assert saved["max_steps"] == 15
    assert saved["model"]["dim"] == 32
    assert saved == to_dict(cfg)
    # the saved file is itself a loadable preset that reproduces the config
    assert load_config(GlamConfig, path / "config.yaml") == cfg


def test_prepare_run_dir_write_false_only_computes_path(tmp_path):
    path = prepare_run_dir("glam", _cfg(tmp_path), write=False)
    assert path == tmp_path / "glam" / "smoke"
    assert not path.exists()


def test_resume_with_identical_config_is_allowed(tmp_path):
    first = prepare_run_dir("glam", _cfg(tmp_path))
    (first / "metrics.jsonl").write_text('{"unit": "moe/seed0", "step": 5}\n')
    again = prepare_run_dir("glam", _cfg(tmp_path))
    assert again == first
    assert (first / "metrics.jsonl").read_text() == '{"unit": "moe/seed0", "step": 5}\n'


@pytest.mark.parametrize(
    "override,key",
    [
        ("max_steps=21", "max_steps"),
        ("model.dim=64", "model.dim"),
        ("seeds=[0,2]", "seeds"),
        ("arms=[moe]", "arms"),
        ("optim.lr=0.01", "optim.lr"),
    ],
)
def test_resume_with_changed_result_key_names_it(tmp_path, override, key):
    prepare_run_dir("glam", _cfg(tmp_path))
    with pytest.raises(ConfigError) as ei:
        prepare_run_dir("glam", _cfg(tmp_path, override))
    msg = str(ei.value)
    assert key in msg
    assert "resume=false" in msg
    # the original config is untouched
    saved = yaml.safe_load((tmp_path / "glam" / "smoke" / "config.yaml").read_text())
    assert saved == to_dict(_cfg(tmp_path))


def test_resume_with_changed_progress_or_threads_is_allowed(tmp_path):
    prepare_run_dir("glam", _cfg(tmp_path))
    path = prepare_run_dir("glam", _cfg(tmp_path, "progress=false", "num_threads=2", "data_dir=/tmp/elsewhere"))
    saved = yaml.safe_load((path / "config.yaml").read_text())
    assert saved["progress"] is False
    assert saved["num_threads"] == 2


def test_resume_false_removes_old_artefacts(tmp_path):
    path = prepare_run_dir("glam", _cfg(tmp_path))
    (path / "checkpoints" / "moe" / "step-00000010").mkdir(parents=True)
    (path / "checkpoints" / "moe" / "latest").write_text("step-00000010\n")
    (path / "units" / "moe-seed0").mkdir(parents=True)
    (path / "figures" / "loss.png").write_bytes(b"png")
    (path / "metrics.jsonl").write_text("{}\n")
    (path / "metrics.rank1.jsonl").write_text("{}\n")
    (path / "access_log.jsonl").write_text("{}\n")
    (path / "results.json").write_text("{}")
    (path / "notes.txt").write_text("mine")

    # a changed config is fine when starting over
    path2 = prepare_run_dir("glam", _cfg(tmp_path, "resume=false", "max_steps=30"))
    assert path2 == path
    assert not (path / "checkpoints").exists()
    assert not (path / "units").exists()
    assert not (path / "metrics.jsonl").exists()
    assert not (path / "metrics.rank1.jsonl").exists() and not (path / "access_log.jsonl").exists()
    assert not (path / "results.json").exists()
    assert (path / "notes.txt").read_text() == "mine"  # only the run's own artefacts go
    assert (path / "figures").is_dir()
    assert list((path / "figures").iterdir()) == []
    assert yaml.safe_load((path / "config.yaml").read_text())["max_steps"] == 30


# --------------------------------------------------------------------------- metrics log


def _records(log: MetricsLog) -> list[tuple[str, int]]:
    return [(r["unit"], r["step"]) for r in log.read()]


def test_metrics_log_appends_and_filters_by_unit(tmp_path):
    log = MetricsLog(tmp_path / "sub" / "metrics.jsonl")
    log.log({"unit": "a", "step": 1, "loss": np.float32(2.5), "n": np.int64(3)})
    log.log({"unit": "b", "step": 1, "loss": 1.0})
    assert log.read("a") == [{"unit": "a", "step": 1, "loss": 2.5, "n": 3}]
    assert [r["unit"] for r in log.read()] == ["a", "b"]
    assert MetricsLog(tmp_path / "none.jsonl").read() == []


def test_metrics_log_disabled_writes_nothing(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl", enabled=False)
    log.log({"unit": "a", "step": 1})
    assert not (tmp_path / "m.jsonl").exists()


def test_truncate_drops_only_that_units_later_records(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    for step in (1, 2, 3, 4, 5):
        log.log({"unit": "a", "step": step})
        log.log({"unit": "b", "step": step})
    log.log({"unit": "a", "event": "eval"})  # no step: kept
    log.truncate("a", 3)
    recs = log.read()
    assert [(r["unit"], r.get("step")) for r in recs] == [
        ("a", 1),
        ("b", 1),
        ("a", 2),
        ("b", 2),
        ("a", 3),
        ("b", 3),
        ("b", 4),
        ("b", 5),
        ("a", None),
    ]


def test_truncate_tolerates_torn_last_line_and_leaves_valid_jsonl(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MetricsLog(path)
    for step in (1, 2, 3):
        log.log({"unit": "a", "step": step})
    with open(path, "a") as fh:
        fh.write('{"unit": "a", "st')  # killed mid-write
    assert _records(log) == [("a", 1), ("a", 2), ("a", 3)]
    log.truncate("a", 2)
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"unit": "a", "step": 1}, {"unit": "a", "step": 2}]
    assert path.read_text().endswith("\n")
    # appending after resumption yields well-formed records
    log.log({"unit": "a", "step": 3})
    assert _records(log) == [("a", 1), ("a", 2), ("a", 3)]
    assert not [p for p in tmp_path.iterdir() if p.name != "m.jsonl"]


def test_truncate_missing_file_is_noop(tmp_path):
    MetricsLog(tmp_path / "m.jsonl").truncate("a", 3)
    assert not (tmp_path / "m.jsonl").exists()


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_text_writes_and_overwrites_without_temp_files(tmp_path):
    target = tmp_path / "deep" / "file.txt"
    atomic_write_text(target, "one\n")
    assert target.read_text() == "one\n"
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]


def test_write_json_handles_numpy_torch_and_paths(tmp_path):
    from pathlib import Path

    write_json(
        tmp_path / "r.json",
        {
            "i": np.int64(3),
            "f": np.float32(0.5),
            "a": np.arange(3),
            "t": torch.tensor([1, 2]),
            "p": Path("x/y"),
        },
    )
    assert json.loads((tmp_path / "r.json").read_text()) == {
        "i": 3,
        "f": 0.5,
        "a": [0, 1, 2],
        "t": [1, 2],
        "p": "x/y",
    }
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    with pytest.raises(TypeError):
        write_json(tmp_path / "bad.json", {"o": object()})


# --------------------------------------------------------------------------- progress


def test_progress_non_tty_logs_every_tenth(caplog, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    caplog.set_level(logging.INFO, logger="thrifty.core.run")
    with progress(100, "training") as advance:
        for i in range(100):
            if i == 99:
                advance(1, loss=0.5)
            else:
                advance()
    msgs = [r.getMessage() for r in caplog.records if r.name == "thrifty.core.run"]
    assert len(msgs) == 10  # at 10%, 20%, ..., 100%
    assert all(m.startswith("training ") for m in msgs)
    assert "10/100" in msgs[0]
    assert "100/100 (100%)" in msgs[-1]
    assert "loss=0.5" in msgs[-1]


def test_progress_non_tty_resumed_start(caplog, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    caplog.set_level(logging.INFO, logger="thrifty.core.run")
    with progress(10, "eval", start=5) as advance:
        for _ in range(5):
            advance()
    msgs = [r.getMessage() for r in caplog.records if r.name == "thrifty.core.run"]
    # 6/10 .. 10/10: one line per 10%
    assert [m.split()[1] for m in msgs] == ["6/10", "7/10", "8/10", "9/10", "10/10"]


def test_progress_disabled_is_silent(caplog, capsys):
    caplog.set_level(logging.DEBUG)
    with progress(10, "quiet", enabled=False) as advance:
        for _ in range(10):
            advance(1, loss=1.0)
    assert caplog.records == []
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ""


# --------------------------------------------------------------------------- seeding, devices, data root


def test_seed_everything_is_reproducible():
    def draw():
        return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randn(2).tolist()

    seed_everything(1234)
    first = draw()
    seed_everything(1234)
    assert draw() == first
    seed_everything(1235)
    assert draw() != first


def test_seed_everything_accepts_large_seed():
    seed_everything(2**40 + 7)
    a = np.random.rand()
    seed_everything(2**40 + 7)
    assert np.random.rand() == a


def test_resolve_device_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_resolve_device_nonsense_is_config_error():
    with pytest.raises(ConfigError, match="device"):
        resolve_device("toaster")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_resolve_device_cuda_without_cuda_is_clear(name):
    with pytest.raises(ConfigError) as ei:
        resolve_device(name)
    msg = str(ei.value)
    assert "'device'" in msg
    assert "CUDA" in msg
    assert "device=cpu" in msg


def test_data_root_prefers_config_then_env(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, f"data_dir={tmp_path / 'd1'}")
    assert data_root(cfg) == tmp_path / "d1"
    assert (tmp_path / "d1").is_dir()
    monkeypatch.setenv("THRIFTY_DATA", str(tmp_path / "d2"))
    assert data_root(_cfg(tmp_path)) == tmp_path / "d2"


# --------------------------------------------------------------------------- portable results


def test_portable_longest_root_wins():
    # "~" listed first: the longer data root must still win for paths inside it
    roots = {"~": "/home/u", "<data_dir>": "/home/u/.cache/thrifty", "<site-packages>": "/opt/py/site-packages"}
    assert portable("/home/u/.cache/thrifty/text/bpe.json", roots) == "<data_dir>/text/bpe.json"
    assert portable("/home/u/.cache/thrifty", roots) == "<data_dir>"
    assert portable("/home/u/notes.txt", roots) == "~/notes.txt"
    assert portable("/home/u", roots) == "~"
    assert portable("/opt/py/site-packages/torch/nn.py", roots) == "<site-packages>/torch/nn.py"


def test_portable_leaves_other_strings_and_non_strings_alone():
    roots = {"<data_dir>": "/home/u/.cache/thrifty", "~": "/home/u"}
    assert portable("/home/uv/x", roots) == "/home/uv/x"  # a prefix but not a parent directory
    assert portable("/home/u.bak", roots) == "/home/u.bak"
    assert portable("see /home/u/x", roots) == "see ~/x"  # a root inside a longer string is replaced too
    assert portable("runs/glam/cpu", roots) == "runs/glam/cpu"
    for v in (3, 2.5, None, True, float("inf")):
        assert portable(v, roots) == v or portable(v, roots) is v


def test_portable_recurses_into_dicts_and_lists():
    roots = {"<data_dir>": "/d", "~": "/home/u"}
    data = {
        "a": ["/d/x", {"b": "/home/u/y", "n": 1}, ("/d", 2)],
        "c": {"d": {"e": "/home/u"}},
        "/home/u/key": "kept",
    }
    assert portable(data, roots) == {
        "a": ["<data_dir>/x", {"b": "~/y", "n": 1}, ["<data_dir>", 2]],
        "c": {"d": {"e": "~"}},
        "/home/u/key": "kept",  # keys are names, not values
    }
    assert data["a"][0] == "/d/x"  # the input is not modified


def test_portable_ignores_empty_and_filesystem_root():
    roots = {"<data_dir>": "", "<root>": "/", "<cwd>": "."}
    assert portable({"p": "/etc/passwd", "q": "./x"}, roots) == {"p": "/etc/passwd", "q": "./x"}


def test_portable_expands_user_in_roots(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert portable(str(tmp_path / "c" / "f"), {"<data_dir>": "~/c"}) == "<data_dir>/f"


def _isolated_machine(tmp_path, monkeypatch):
    """A home directory and a working directory under ``tmp_path``."""
    home, cwd = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("THRIFTY_DATA", raising=False)
    return home, cwd


def test_finish_run_writes_portable_results_and_returns_real_paths(tmp_path, monkeypatch):
    import sysconfig
    import time

    from thrifty.core.reference import machine_paths
    from thrifty.core.run import finish_run

    home, cwd = _isolated_machine(tmp_path, monkeypatch)
    data_dir = home / ".cache" / "thrifty"
    cfg = load_config(GlamConfig, preset_path("glam", "smoke"), ["out_dir=runs", f"data_dir={data_dir}"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    site = sysconfig.get_paths()["purelib"]
    summary = {
        "recipe": "glam",
        "run_dir": "runs/glam/smoke",
        "data": {"tokenizer": str(data_dir / "text" / "bpe.json"), "files": [str(data_dir / "a"), 3]},
        "source": f"{site}/thrifty/__init__.py",
        "here": str(cwd / "runs" / "glam" / "smoke"),
        "loss": 2.5,
    }
    returned = finish_run(summary, run_dir, cfg, t_start=time.perf_counter(), tokens_per_s={"moe": 10.0})

    text = (run_dir / "results.json").read_text()
    assert str(tmp_path) not in text
    assert site not in text
    written = json.loads(text)
    assert machine_paths(written) == []
    assert written["data"] == {"tokenizer": "<data_dir>/text/bpe.json", "files": ["<data_dir>/a", 3]}
    assert written["source"] == "<site-packages>/thrifty/__init__.py"
    assert written["here"] == "./runs/glam/smoke"
    assert written["run_dir"] == "runs/glam/smoke"
    assert written["config"]["data_dir"] == "<data_dir>"
    assert written["config"]["out_dir"] == "runs"
    assert written["loss"] == 2.5
    assert written["cost"]["tokens_per_s"] == {"moe": 10.0}
    assert {"wall_time_s", "peak_rss_mb", "world_size"} <= set(written["cost"])
    assert {"commit", "dirty", "processor", "threads"} <= set(written["environment"])
    # the returned summary keeps the real paths, usable on this machine
    assert returned is summary
    assert returned["data"]["tokenizer"] == str(data_dir / "text" / "bpe.json")
    assert returned["config"]["data_dir"] == str(data_dir)
    assert returned["here"] == str(cwd / "runs" / "glam" / "smoke")


def test_finish_run_hides_absolute_out_dir(tmp_path, monkeypatch):
    import time

    from thrifty.core.run import finish_run

    _isolated_machine(tmp_path, monkeypatch)
    out_dir, data_dir = tmp_path / "runs", tmp_path / "data"
    cfg = load_config(GlamConfig, preset_path("glam", "smoke"), [f"out_dir={out_dir}", f"data_dir={data_dir}"])
    run_dir = out_dir / "glam" / "smoke"
    run_dir.mkdir(parents=True)
    finish_run({"recipe": "glam", "run_dir": str(run_dir)}, run_dir, cfg, t_start=time.perf_counter())
    text = (run_dir / "results.json").read_text()
    assert str(data_dir) not in text
    assert str(tmp_path) not in text


def test_finish_run_home_placeholder_is_accepted_by_reference_check(tmp_path, monkeypatch):
    import time

    from thrifty.core.reference import machine_paths
    from thrifty.core.run import finish_run

    home, _ = _isolated_machine(tmp_path, monkeypatch)
    cfg = load_config(GlamConfig, preset_path("glam", "smoke"), ["out_dir=runs", f"data_dir={tmp_path / 'data'}"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    finish_run({"recipe": "glam", "log": str(home / "notes.txt")}, run_dir, cfg, t_start=time.perf_counter())
    written = json.loads((run_dir / "results.json").read_text())
    assert written["log"] == "<home>/notes.txt"  # what portable writes for the home directory
    assert machine_paths(written) == []


def test_environment_records_commit_and_dirty():
    from thrifty.core.run import environment

    env = environment(torch.device("cpu"))
    assert {"commit", "dirty", "torch", "python", "processor", "threads", "device"} <= set(env)
    assert env["device"] == "cpu"
    assert isinstance(env["commit"], str)
    if env["commit"] == "unknown":
        assert env["dirty"] is None
    else:
        assert len(env["commit"]) == 40
        assert int(env["commit"], 16) >= 0
        assert env["dirty"] in (True, False, None)
