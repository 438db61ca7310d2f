"""Reports: claims table with computed verdicts, run tables, and a self-contained HTML page."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest

from thrifty.core.claims import paired_claim, value_claim
from thrifty.core.report import ReportError, load_results, render


def _png(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(1.0, 1.0), dpi=20)
    ax.plot([0, 1, 2], [1, 0, 1])
    fig.savefig(path, format="png")
    plt.close(fig)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return data


def _make_run(run_dir: Path, recipe: str = "glam") -> bytes:
    holding = paired_claim(
        id="moe_beats_dense_active",
        statement="MoE has lower val loss | than dense-active",
        a={0: 3.0, 1: 3.1, 2: 2.9},
        b={0: 4.0, 1: 4.0, 2: 4.0},
        direction="less",
        paper_value="yes",
        preset="smoke",
        baseline="dense-active",
        unit="nats",
    )
    failing = value_claim(
        id="drop_rate_small",
        statement="token drop rate <b>below</b> 1%",
        values=[0.5, 3.0, 1.5],
        seeds=[0, 1, 2],
        direction="less",
        threshold=1.0,
        paper_value=0.01,
        preset="smoke",
        unit="%",
    )
    assert holding.holds and not failing.holds
    run_dir.mkdir(parents=True, exist_ok=True)
    png = _png(run_dir / "figures" / "loss.png")
    results = {
        "recipe": recipe,
        "preset": "smoke",
        "paper": {"title": "GLaM", "arxiv": "2112.06905"},
        "claims": [holding.to_dict(), failing.to_dict()],
        "tables": [
            {
                "title": "Final validation loss",
                "columns": ["arm", "loss"],
                "rows": [["moe", 3.0], ["dense-active", 4.0]],
            }
        ],
        "cost": {"wall_time_s": 12.34, "peak_rss_mb": 256.0, "params": {"moe": 1234.0}},
        "notes": ["miniature run"],
        "figures": ["figures/loss.png", "figures/missing.png"],
    }
    (run_dir / "results.json").write_text(json.dumps(results, allow_nan=False))
    return png


def _table_rows(md: str) -> list[list[str]]:
    rows = []
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
            rows.append([c.strip() for c in cells])
    return rows


def test_render_writes_markdown_with_claims_and_verdicts(tmp_path):
    run = tmp_path / "runs" / "glam" / "smoke"
    _make_run(run)
    out = tmp_path / "out"
    md_path, html_path = render([run], out, title="unit report")
    assert md_path == out / "report.md"
    assert html_path == out / "report.html"
    md = md_path.read_text()
    assert md.startswith("# unit report")
    assert "1 of 2 claims hold" in md

    rows = {r[1]: r for r in _table_rows(md) if len(r) == 10}
    assert rows["moe_beats_dense_active"][0] == "glam"
    assert rows["moe_beats_dense_active"][-1] == "holds"
    assert rows["moe_beats_dense_active"][7] == "3"  # seeds
    assert rows["moe_beats_dense_active"][6] == "< 0"
    # diffs -1.0, -0.9, -1.1: mean -1, half width 4.3027 * 0.1 / sqrt(3) = 0.2484 (4 significant digits)
    assert rows["moe_beats_dense_active"][4] == "-1 nats"
    assert rows["moe_beats_dense_active"][5] == "[-1.248, -0.7516]"
    assert rows["moe_beats_dense_active"][3] == "yes"
    assert rows["drop_rate_small"][-1] == "does not hold"
    assert rows["drop_rate_small"][6] == "< 1"
    assert rows["drop_rate_small"][8] == "smoke"
    # a '|' inside a statement is escaped and does not break the table
    assert "lower val loss \\| than" in md
    # run tables, cost and notes
    assert "### Final validation loss" in md
    assert "| moe | 3 |" in md
    assert "| dense-active | 4 |" in md
    assert "| wall time (s) | 12.3 |" in md
    assert "> miniature run" in md
    assert "arXiv 2112.06905" in md


def test_render_html_is_self_contained_with_embedded_png(tmp_path):
    run = tmp_path / "run"
    png = _make_run(run)
    _, html_path = render([run], tmp_path / "out")
    page = html_path.read_text()
    assert page.startswith("<!doctype html>")
    assert "data:image/png;base64," + base64.b64encode(png).decode() in page
    # every src is an inline data URI; no links to external files or stylesheets
    srcs = re.findall(r"src=['\"]([^'\"]*)['\"]", page)
    assert len(srcs) == 1  # the missing figure is skipped
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "href=" not in page
    assert page.count("figures/loss.png") == 2  # only the alt text and the caption name the file
    assert "<link" not in page
    # verdict cells are classed and the statement is escaped
    assert '<td class="ok">holds</td>' in page
    assert '<td class="bad">does not hold</td>' in page
    assert "&lt;b&gt;below&lt;/b&gt;" in page
    assert "<b>below</b>" not in page


def test_render_into_run_dir_links_figure_relatively(tmp_path):
    run = tmp_path / "run"
    _make_run(run)
    md_path, _ = render([run], run)
    md = md_path.read_text()
    assert "![figures/loss.png](figures/loss.png)" in md
    assert "missing.png" not in md


def test_render_several_runs_counts_all_claims(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _make_run(a, recipe="glam")
    _make_run(b, recipe="other")
    md_path, _ = render([a, b], tmp_path / "out")
    md = md_path.read_text()
    assert "2 of 4 claims hold" in md
    recipes = [r[0] for r in _table_rows(md) if len(r) == 10 and r[0] != "recipe"]
    assert recipes == ["glam", "glam", "other", "other"]


def test_single_seed_claim_shows_undefined_interval(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    c = value_claim(
        id="one_seed",
        statement="s",
        values=[0.1],
        seeds=[0],
        direction="less",
        threshold=1.0,
        paper_value=None,
        preset="smoke",
    )
    (run / "results.json").write_text(json.dumps({"recipe": "glam", "preset": "smoke", "claims": [c.to_dict()]}))
    md_path, _ = render([run], run)
    row = next(r for r in _table_rows(md_path.read_text()) if r[1:2] == ["one_seed"])
    assert row[5] == "undefined (1 seed)"
    assert row[3] == "—"
    assert row[-1] == "does not hold"
    assert "0 of 1 claims hold" in md_path.read_text()


def test_missing_results_raises_report_error_naming_dir(tmp_path):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    with pytest.raises(ReportError) as ei:
        render([empty], tmp_path / "out")
    assert str(empty) in str(ei.value)
    assert "results.json" in str(ei.value)
    assert not (tmp_path / "out" / "report.md").exists()


def test_invalid_results_json_raises_report_error(tmp_path):
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ReportError, match=re.escape("results.json")):
        load_results(tmp_path)


def test_load_results_records_run_dir(tmp_path):
    (tmp_path / "results.json").write_text('{"recipe": "glam"}')
    assert load_results(tmp_path) == {"recipe": "glam", "_run_dir": str(tmp_path)}
