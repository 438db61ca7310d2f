"""Committed reference results: publishing a claim-preset run, self-consistency checks and the claims log."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from thrifty.core.claims import paired_claim, works_claim
from thrifty.core.reference import (
    LOG_NAME,
    ReferenceError,
    append_log,
    check_reference,
    docs_dirs,
    load_reference,
    log_line,
    machine_paths,
    publish,
    reference_dir,
)
from thrifty.core.registry import RECIPES, get

SEEDS = [100, 101, 102, 103, 104]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
FIGURE = b"\x89PNG\r\n\x1a\nnot really a png"


@pytest.fixture(autouse=True)
def _no_docs_env(monkeypatch):
    monkeypatch.delenv("THRIFTY_DOCS_DIR", raising=False)


def _claims() -> list[dict]:
    # moe - dense-active: -0.1, -0.2, -0.3, -0.2, -0.2: mean -0.2, sd sqrt(0.02 / 4) = 0.070711, half width
    # t(0.975, 4) * sd / sqrt(5) = 2.776445 * 0.031623 = 0.087799 -> [-0.2878, -0.1122]: holds.
    # moe - bigram: -0.2, -0.25, -0.15, -0.2, -0.2: mean -0.2, sd sqrt(0.005 / 4) = 0.035355, half width
    # 2.776445 * 0.015811 = 0.043900 -> [-0.2439, -0.1561]: not below -0.5 (margin 0.5), does not hold.
    headline = paired_claim(
        id="moe_beats_dense_active",
        statement="MoE test loss below dense-active",
        a={s: 3.0 + d for s, d in zip(SEEDS, [-0.1, -0.2, -0.3, -0.2, -0.2])},
        b={s: 3.0 for s in SEEDS},
        direction="less",
        paper_value="yes",
        preset="cpu",
        baseline="dense-active",
        unit="nats",
    )
    works = works_claim(
        id="moe_beats_bigram",
        statement="MoE test loss below the Kneser-Ney bigram by 0.5 nats",
        method={s: 4.0 + d for s, d in zip(SEEDS, [-0.1, -0.15, -0.05, -0.1, -0.1])},
        baseline_value=4.1,
        margin=0.5,
        direction="less",
        paper_value="works",
        preset="cpu",
        baseline="kneser-ney bigram",
        unit="nats",
    )
    assert headline.holds and not works.holds
    return [headline.to_dict(), works.to_dict()]


def _results(preset: str = "cpu", dirty: bool | None = False, commit: str = COMMIT) -> dict:
    return {
        "recipe": "glam",
        "paper": {"title": "GLaM", "arxiv": "2112.06905"},
        "preset": preset,
        "run_dir": f"runs/glam/{preset}",
        "created": "2026-01-15 10:20:30",
        "claims": _claims(),
        "tables": [{"title": "t", "columns": ["arm", "loss"], "rows": [["moe", 2.8]]}],
        "figures": ["figures/loss.png", "figures/never_written.png"],
        "environment": {
            "commit": commit,
            "dirty": dirty,
            "processor": "Some CPU @ 2.0GHz",
            "machine": "x86_64",
            "cpu_count": 2,
            "threads": 2,
            "torch": "2.0",
        },
        "cost": {"wall_time_s": 2400.0, "peak_rss_mb": 812.5},
        "config": _preset_config("cpu", data_dir="<data_dir>"),
    }


def _preset_config(preset: str, **changes) -> dict:
    """GLaM's committed preset, resolved as a run records it in results.json (plus ``changes``)."""
    from thrifty.core.config import to_dict
    from thrifty.core.registry import load_config

    _, cfg = load_config("glam", preset)
    return {**to_dict(cfg), **changes}


def _run(tmp_path: Path, name: str = "run", **kw) -> Path:
    run = tmp_path / name
    (run / "figures").mkdir(parents=True)
    (run / "figures" / "loss.png").write_bytes(FIGURE)
    (run / "results.json").write_text(json.dumps(_results(**kw), allow_nan=False))
    return run


def _published(tmp_path: Path) -> dict:
    out = publish(_run(tmp_path), docs_dir=tmp_path / "docs")
    return json.loads((out / "results.json").read_text())


# --------------------------------------------------------------------------- publish


def test_publish_writes_results_figure_and_reference_block(tmp_path):
    docs = tmp_path / "docs"
    out = publish(_run(tmp_path), docs_dir=docs)
    assert out == docs / "glam" / "reference"
    assert (out / "figures" / "loss.png").read_bytes() == FIGURE
    assert not (out / "figures" / "never_written.png").exists()
    ref = json.loads((out / "results.json").read_text())
    prov = ref["reference"]
    assert prov["commit"] == COMMIT
    assert prov["dirty"] is False
    assert prov["preset"] == "cpu"
    assert prov["seeds"] == SEEDS
    assert prov["date"] == "2026-01-15 10:20:30"
    assert prov["processor"] == "Some CPU @ 2.0GHz"
    assert prov["threads"] == 2
    assert prov["wall_time_s"] == 2400.0
    assert prov["peak_rss_mb"] == 812.5
    # everything else of the run is kept as it was
    original = _results()
    assert {k: v for k, v in ref.items() if k != "reference"} == original
    assert check_reference(ref) == []


def test_publish_replaces_an_older_reference(tmp_path):
    docs = tmp_path / "docs"
    publish(_run(tmp_path, "a"), docs_dir=docs)
    (docs / "glam" / "reference" / "figures" / "stale.png").write_bytes(b"old")
    publish(_run(tmp_path, "b", commit="f" * 40), docs_dir=docs)
    ref = json.loads((docs / "glam" / "reference" / "results.json").read_text())
    assert ref["reference"]["commit"] == "f" * 40
    assert not (docs / "glam" / "reference" / "figures" / "stale.png").exists()
    assert not (docs / "glam" / "reference.tmp").exists()


def test_publish_other_preset_raises_naming_file_and_presets(tmp_path):
    run = _run(tmp_path, preset="quick")
    docs = tmp_path / "docs"
    with pytest.raises(ReferenceError) as ei:
        publish(run, docs_dir=docs)
    msg = str(ei.value)
    assert str(run / "results.json") in msg
    assert "'quick'" in msg
    assert "'cpu'" in msg
    assert not (docs / "glam").exists()


def test_publish_dirty_run_raises(tmp_path):
    run = _run(tmp_path, dirty=True)
    with pytest.raises(ReferenceError, match="uncommitted") as ei:
        publish(run, docs_dir=tmp_path / "docs")
    assert str(run / "results.json") in str(ei.value)
    assert not (tmp_path / "docs" / "glam").exists()


def test_publish_dir_without_results_raises_naming_it(tmp_path):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    with pytest.raises(ReferenceError) as ei:
        publish(empty, docs_dir=tmp_path / "docs")
    assert str(empty) in str(ei.value)
    assert "results.json" in str(ei.value)


def test_publish_inconsistent_claims_raises_naming_claim(tmp_path):
    run = _run(tmp_path)
    data = json.loads((run / "results.json").read_text())
    data["claims"][1]["holds"] = True
    (run / "results.json").write_text(json.dumps(data))
    with pytest.raises(ReferenceError, match="moe_beats_bigram"):
        publish(run, docs_dir=tmp_path / "docs")
    assert not (tmp_path / "docs" / "glam" / "reference").exists()


def test_publish_run_naming_a_machine_path_raises(tmp_path):
    run = _run(tmp_path)
    data = json.loads((run / "results.json").read_text())
    data["config"]["data_dir"] = "/home/x/.cache/thrifty"
    (run / "results.json").write_text(json.dumps(data))
    with pytest.raises(ReferenceError, match="machine path"):
        publish(run, docs_dir=tmp_path / "docs")


# --------------------------------------------------------------------------- check_reference


@pytest.mark.parametrize("index", [0, 1])
def test_tampered_holds_is_reported(tmp_path, index):
    ref = _published(tmp_path)
    cid = ref["claims"][index]["id"]
    ref["claims"][index]["holds"] = not ref["claims"][index]["holds"]
    problems = check_reference(ref)
    assert len(problems) == 1
    assert f"'{cid}'" in problems[0]
    assert "holds" in problems[0]


def test_tampered_measured_is_reported(tmp_path):
    ref = _published(tmp_path)
    ref["claims"][0]["measured"] += 0.01
    problems = check_reference(ref)
    assert problems and all("'moe_beats_dense_active'" in p for p in problems)
    assert any("measured" in p for p in problems)


def _lower_bound(c: dict) -> None:
    c["ci95"][0] -= 1e-3


def _upper_bound(c: dict) -> None:
    c["ci95"][1] -= 1e-3


def _seed_count(c: dict) -> None:
    c["n_seeds"] = 4


@pytest.mark.parametrize(
    ("index", "field", "tamper"),
    [(1, "ci95", _lower_bound), (1, "ci95", _upper_bound), (0, "n_seeds", _seed_count)],
    ids=["ci_lower", "ci_upper", "n_seeds"],
)
def test_tampered_interval_or_seed_count_is_reported(tmp_path, index, field, tamper):
    ref = _published(tmp_path)
    cid = ref["claims"][index]["id"]
    tamper(ref["claims"][index])
    problems = check_reference(ref)
    assert len(problems) == 1
    assert f"'{cid}'" in problems[0]
    assert field in problems[0]


def test_tampered_values_are_reported(tmp_path):
    ref = _published(tmp_path)
    ref["claims"][0]["values"][0] = 1.0  # the stored mean, interval and verdict no longer follow
    problems = check_reference(ref)
    assert problems and all("'moe_beats_dense_active'" in p for p in problems)


@pytest.mark.parametrize("key", ["measured", "ci95", "n_seeds", "holds", "values"])
def test_claim_missing_a_field_is_reported(tmp_path, key):
    ref = _published(tmp_path)
    del ref["claims"][1][key]
    problems = check_reference(ref)
    assert any("'moe_beats_bigram'" in p and f"'{key}'" in p for p in problems)


def test_missing_reference_block_and_claims_are_reported(tmp_path):
    ref = _published(tmp_path)
    no_block = {k: v for k, v in ref.items() if k != "reference"}
    assert any("'reference' block" in p for p in check_reference(no_block))
    partial = copy.deepcopy(ref)
    del partial["reference"]["threads"]
    assert any("'threads'" in p for p in check_reference(partial))
    assert any("no claims" in p for p in check_reference({**ref, "claims": []}))


@pytest.mark.parametrize(
    "where,value",
    [
        ("table", "/home/x/.cache/thrifty/text"),
        ("note", "cached in /home/x/.cache/thrifty/text/bpe.json"),
        ("table", "/usr/lib/python3/site-packages/thrifty/data/text.py"),
        ("note", ".../site-packages/..."),
        ("note", "C:\\Users\\x\\runs"),
        ("note", "~/runs/glam"),
    ],
)
def test_machine_path_anywhere_is_reported(tmp_path, where, value):
    ref = _published(tmp_path)
    if where == "table":
        ref["tables"][0]["rows"].append(["path", value])
    else:
        ref["notes"] = ["fine", value]
    problems = check_reference(ref)
    assert len(problems) == 1
    assert "machine path" in problems[0]
    assert repr(value) in problems[0]


def test_portable_placeholders_are_not_machine_paths():
    # what run.portable writes in place of this machine's directories
    data = {
        "a": "<data_dir>/text/bpe.json",
        "b": ["runs/glam/cpu", "./runs/x", "~", 3, None],
        "c": "1/2 of the seeds",
        "d": "<site-packages>/thrifty/data/text.py",
        "e": "<platlib>/torch/lib",
    }
    assert machine_paths(data) == []
    assert len(machine_paths({"d": "<site-packages>/x, then /opt/py/site-packages/y"})) == 1
    found = machine_paths({"x": [{"y": "/home/u/a"}]})
    assert found == ["x[0].y: '/home/u/a'"]


# --------------------------------------------------------------------------- load_reference


def test_load_reference_follows_docs_env(tmp_path, monkeypatch):
    docs = tmp_path / "docs"
    publish(_run(tmp_path), docs_dir=docs)
    monkeypatch.setenv("THRIFTY_DOCS_DIR", str(docs))
    assert docs_dirs() == [docs]
    assert reference_dir("glam") == docs / "glam" / "reference"
    ref = load_reference("glam")
    assert ref is not None
    assert ref["_run_dir"] == str(docs / "glam" / "reference")
    assert ref["preset"] == "cpu"
    assert [c["id"] for c in ref["claims"]] == ["moe_beats_dense_active", "moe_beats_bigram"]
    assert load_reference("squid") is None
    assert reference_dir("squid") is None


def test_loaded_reference_passes_its_own_check(tmp_path, monkeypatch):
    # load_reference adds _run_dir (where it was found on this machine); that is not part of the file
    docs = tmp_path / "docs"
    publish(_run(tmp_path), docs_dir=docs)
    monkeypatch.setenv("THRIFTY_DOCS_DIR", str(docs))
    ref = load_reference("glam")
    assert check_reference(ref) == []


def test_unreadable_reference_raises_naming_file(tmp_path, monkeypatch):
    bad = tmp_path / "docs" / "glam" / "reference" / "results.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    monkeypatch.setenv("THRIFTY_DOCS_DIR", str(tmp_path / "docs"))
    with pytest.raises(ReferenceError, match=r"results\.json"):
        load_reference("glam")


# --------------------------------------------------------------------------- claims log


def _log_rows(text: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index("|---|---|---|---|---|---|") + 1
    return lines[start:]


def test_two_publishes_append_two_lines(tmp_path):
    docs = tmp_path / "docs"
    publish(_run(tmp_path, "a"), docs_dir=docs)
    log = docs / "glam" / LOG_NAME
    first = log.read_text()
    assert first.count("# Claims log") == 1
    rows = _log_rows(first)
    assert len(rows) == 1
    row = rows[0]
    assert row.startswith("| 2026-01-15 10:20:30 | 0123456789 | cpu | 100, 101, 102, 103, 104 | 40.0 min |")
    assert "moe_beats_dense_active: -0.2 [-0.2878, -0.1122] (5 seeds), holds" in row
    assert "moe_beats_bigram: -0.2 [-0.2439, -0.1561] (5 seeds), does not hold" in row

    publish(_run(tmp_path, "b", commit="f" * 40), docs_dir=docs)
    second = log.read_text()
    assert second.startswith(first)
    assert second.count("# Claims log") == 1
    rows = _log_rows(second)
    assert len(rows) == 2
    assert rows[0] == row
    assert "| ffffffffff |" in rows[1]


def test_publish_without_log_leaves_no_log(tmp_path):
    docs = tmp_path / "docs"
    publish(_run(tmp_path), docs_dir=docs, log=False)
    assert (docs / "glam" / "reference" / "results.json").is_file()
    assert not (docs / "glam" / LOG_NAME).exists()


def test_append_log_creates_header_once(tmp_path):
    ref = _published(tmp_path)
    path = tmp_path / "new" / "dir" / LOG_NAME
    append_log(path, ref)
    append_log(path, ref)
    append_log(path, ref)
    text = path.read_text()
    assert text.startswith("# Claims log\n")
    assert text.count("# Claims log") == 1
    assert text.count("| date | commit |") == 1
    assert _log_rows(text) == [log_line(ref)] * 3
    assert text.endswith("\n")


def test_append_log_keeps_a_file_without_final_newline(tmp_path):
    ref = _published(tmp_path)
    path = tmp_path / LOG_NAME
    path.write_text(
        "# Claims log\n\n| date | commit | preset | seeds | wall time | claims |\n|---|---|---|---|---|---|"
    )
    append_log(path, ref)
    assert path.read_text().splitlines()[-2:] == ["|---|---|---|---|---|---|", log_line(ref)]


# --------------------------------------------------------------------------- the committed references


def test_every_committed_reference_is_consistent():
    """Passes trivially until a reference is committed; then guards it (e.g. docs/glam/reference/)."""
    for recipe in RECIPES:
        ref = load_reference(recipe.name)
        if ref is None:
            continue
        assert check_reference(ref, source=recipe.name) == []
        assert ref["preset"] == recipe.claim_preset, recipe.name
        assert ref["reference"]["preset"] == recipe.claim_preset, recipe.name
        for claim in ref["claims"]:
            if claim.get("kind") in ("paired", "works"):
                assert claim["n_seeds"] == 5, (recipe.name, claim["id"])
                assert len(claim["seeds"]) == 5, (recipe.name, claim["id"])
        assert get(recipe.name).headline_claim(ref["claims"]) is not None, recipe.name


def test_glam_reference_is_committed_and_shown_beside_a_fresh_run(tmp_path, monkeypatch):
    """The claim-preset reference ships with the code, and a report of a fresh GLaM run shows it."""
    from thrifty.core.report import render

    monkeypatch.delenv("THRIFTY_DOCS_DIR", raising=False)
    ref = load_reference("glam")
    assert ref is not None, "docs/glam/reference/results.json is missing"
    assert ref["reference"]["preset"] == get("glam").claim_preset
    headline = get("glam").headline_claim(ref["claims"])
    assert headline is not None and headline["n_seeds"] == 5
    assert any(c["kind"] == "works" for c in ref["claims"])
    assert all((Path(ref["_run_dir"]) / f).is_file() for f in ref["figures"])

    run = tmp_path / "runs" / "glam" / "quick"
    run.mkdir(parents=True)
    fresh = {**{k: ref[k] for k in ("recipe", "claims")}, "preset": "quick", "cost": {"wall_time_s": 240.0}}
    (run / "results.json").write_text(json.dumps(fresh))
    md, _ = render([run], tmp_path / "report")
    text = md.read_text()
    summary = text.split("## Summary", 1)[1].split("##", 1)[0]
    assert f"commit {ref['reference']['commit'][:10]}" in summary
    assert "preset cpu, 5 seeds" in summary
    assert "Fresh run and committed reference" in text


def test_every_claim_preset_is_pre_registered_with_five_seeds():
    """A recipe's claim preset exists as a committed file with 5 seeds; recipes without one say so (None)."""
    from thrifty.core.registry import load_config

    with_preset = [r for r in RECIPES if r.ready and r.claim_preset is not None]
    assert [r.name for r in with_preset][:1] == ["glam"]
    for r in with_preset:
        _, cfg = load_config(r.name, r.claim_preset)
        assert len(cfg.seeds) == 5 and len(set(cfg.seeds)) == 5, r.name
