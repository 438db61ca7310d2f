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


@pytest.fixture(autouse=True)
def _no_committed_references(tmp_path_factory, monkeypatch):
    """render() loads the repository's committed references by default; these tests build their own."""
    monkeypatch.setenv("THRIFTY_DOCS_DIR", str(tmp_path_factory.mktemp("no-docs")))


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
    assert "1 of 2 claims of the fresh runs hold" in md

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
    assert "2 of 4 claims of the fresh runs hold" in md
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
    assert "0 of 1 claims of the fresh runs hold" in md_path.read_text()


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


# --------------------------------------------------------------------------- summary and committed reference

REF_SEEDS = [100, 101, 102, 103, 104]


def _fresh_run(run_dir: Path) -> None:
    """``_make_run`` plus a works claim, the seeds in the config and a commit."""
    from thrifty.core.claims import works_claim

    _make_run(run_dir)
    data = json.loads((run_dir / "results.json").read_text())
    # method - bigram: -1.0, -0.9, -1.1 -> -1 [-1.248, -0.7516], below -0.5
    works = works_claim(
        id="moe_beats_bigram",
        statement="MoE below the bigram by 0.5 nats",
        method={0: 3.0, 1: 3.1, 2: 2.9},
        baseline_value=4.0,
        margin=0.5,
        direction="less",
        paper_value="works",
        preset="smoke",
        baseline="bigram",
        unit="nats",
    )
    data["claims"].append(works.to_dict())
    data["config"] = {"seeds": [0, 1, 2]}
    data["environment"] = {"commit": "abcdef1234567890", "dirty": False}
    (run_dir / "results.json").write_text(json.dumps(data, allow_nan=False))


def _reference(ref_dir: Path) -> dict:
    """A committed reference of glam at its claim preset (5 seeds), as load_reference returns it."""
    from thrifty.core.claims import works_claim

    # moe - dense-active: -0.1, -0.2, -0.3, -0.2, -0.2: mean -0.2, sd sqrt(0.02 / 4) = 0.070711,
    # half width t(0.975, 4) * sd / sqrt(5) = 2.776445 * 0.031623 = 0.087799 -> [-0.2878, -0.1122]
    headline = paired_claim(
        id="moe_beats_dense_active",
        statement="MoE test loss below dense-active",
        a={s: 3.0 + d for s, d in zip(REF_SEEDS, [-0.1, -0.2, -0.3, -0.2, -0.2])},
        b={s: 3.0 for s in REF_SEEDS},
        direction="less",
        paper_value="yes",
        preset="cpu",
        baseline="dense-active",
        unit="nats",
    )
    # moe - bigram: -0.2, -0.25, -0.15, -0.2, -0.2: mean -0.2, sd 0.035355, half 0.0439 -> [-0.2439, -0.1561];
    # margin 0.5: does not hold
    works = works_claim(
        id="moe_beats_bigram",
        statement="MoE below the bigram by 0.5 nats",
        method={s: 3.9 + d for s, d in zip(REF_SEEDS, [-0.1, -0.15, -0.05, -0.1, -0.1])},
        baseline_value=4.0,
        margin=0.5,
        direction="less",
        paper_value="works",
        preset="cpu",
        baseline="bigram",
        unit="nats",
    )
    only_here = value_claim(
        id="expert_load_balanced",
        statement="max expert load below 2x",
        values=[1.2, 1.3, 1.1, 1.2, 1.2],
        seeds=REF_SEEDS,
        direction="less",
        threshold=2.0,
        paper_value="balanced",
        preset="cpu",
    )
    _png(ref_dir / "figures" / "ref_loss.png")
    return {
        "_run_dir": str(ref_dir),
        "recipe": "glam",
        "preset": "cpu",
        "claims": [headline.to_dict(), works.to_dict(), only_here.to_dict()],
        "figures": ["figures/ref_loss.png"],
        "cost": {"wall_time_s": 2400.0, "peak_rss_mb": 812.5},
        "config": {"seeds": REF_SEEDS},
        "reference": {
            "preset": "cpu",
            "seeds": REF_SEEDS,
            "commit": "0123456789abcdef0123",
            "dirty": False,
            "date": "2026-01-15 10:20:30",
            "processor": "Some CPU @ 2.0GHz",
            "threads": 2,
            "wall_time_s": 2400.0,
            "peak_rss_mb": 812.5,
        },
    }


def _section_table(md: str, heading: str) -> list[list[str]]:
    """The rows (header first) of the first table after the line ``heading``."""
    lines = md.splitlines()
    i = lines.index(heading) + 1
    while not lines[i].startswith("|"):
        i += 1
    block = []
    while i < len(lines) and lines[i].startswith("|"):
        block.append(lines[i])
        i += 1
    return _table_rows("\n".join(block))


FRESH_HEADLINE = "moe_beats_dense_active: -1 [-1.248, -0.7516] (3 seeds) — holds"
FRESH_WORKS = "moe_beats_bigram: -1 [-1.248, -0.7516] (3 seeds) — holds"
REF_HEADLINE = "moe_beats_dense_active: -0.2 [-0.2878, -0.1122] (5 seeds) — holds"
REF_WORKS = "moe_beats_bigram: -0.2 [-0.2439, -0.1561] (5 seeds) — does not hold"
REF_LABEL = "preset cpu, 5 seeds, commit 0123456789, 2026-01-15"


def test_summary_shows_fresh_run_beside_committed_reference(tmp_path):
    run = tmp_path / "runs" / "glam" / "smoke"
    _fresh_run(run)
    ref = _reference(tmp_path / "docs" / "glam" / "reference")
    md_path, html_path = render([run], tmp_path / "out", references={"glam": ref})
    md = md_path.read_text()

    table = _section_table(md, "## Summary")
    header, rows = table[0], table[1:]
    assert header[0] == "recipe"
    assert len(rows) == 1
    row = dict(zip(header, rows[0]))
    assert row["recipe"] == "glam"
    assert row["works claim (fresh run)"] == f"{FRESH_WORKS} (at smoke)"
    assert row["headline claim (fresh run)"] == f"{FRESH_HEADLINE} (at smoke)"
    assert row["headline claim at the claim preset (reference)"] == f"{REF_HEADLINE} ({REF_LABEL})"
    assert row["works claim (reference)"] == REF_WORKS
    # 12.34 s and 2400 s
    assert row["wall time: fresh / reference"] == "0.2 min / 40.0 min"
    assert "2 of 3 claims of the fresh runs hold" in md  # the reference's claims are not counted


def test_report_has_fresh_run_and_reference_section(tmp_path):
    run = tmp_path / "runs" / "glam" / "smoke"
    _fresh_run(run)
    ref_dir = tmp_path / "docs" / "glam" / "reference"
    ref = _reference(ref_dir)
    md_path, html_path = render([run], tmp_path / "out", references={"glam": ref})
    md = md_path.read_text()
    assert md.count("### Fresh run and committed reference") == 1
    # both directories are named relative to the report, so the report holds no machine path
    assert "Reference: `../docs/glam/reference`, produced on Some CPU @ 2.0GHz with 2 threads in 40.0 min" in md
    assert "Run directory: `../runs/glam/smoke`" in md
    assert str(tmp_path) not in md and str(tmp_path) not in html_path.read_text()
    table = _section_table(md, "### Fresh run and committed reference")
    assert table[0] == ["claim", "fresh run (preset smoke, 3 seeds, commit abcdef1234)", f"reference ({REF_LABEL})"]
    cells = {r[0]: r[1:] for r in table[1:]}
    assert list(cells) == ["moe_beats_dense_active", "drop_rate_small", "moe_beats_bigram", "expert_load_balanced"]
    assert cells["moe_beats_dense_active"] == [FRESH_HEADLINE, REF_HEADLINE]
    assert cells["moe_beats_bigram"] == [FRESH_WORKS, REF_WORKS]
    assert cells["drop_rate_small"][1] == "—"
    assert cells["drop_rate_small"][0].endswith("(3 seeds) — does not hold")
    assert cells["expert_load_balanced"][0] == "—"
    assert cells["expert_load_balanced"][1].endswith("(5 seeds) — holds")
    # the reference's figure is shown, labelled as the reference
    assert "![figures/ref_loss.png (reference, preset cpu)](" in md
    page = html_path.read_text()
    assert "Fresh run and committed reference" in page
    assert page.count("data:image/png;base64,") == 2


def test_summary_without_reference_names_the_claim_preset(tmp_path):
    run = tmp_path / "runs" / "glam" / "smoke"
    _fresh_run(run)
    md_path, html_path = render([run], tmp_path / "out", references={})
    md = md_path.read_text()
    table = _section_table(md, "## Summary")
    row = dict(zip(table[0], table[1]))
    assert len(table) == 2
    assert row["headline claim (fresh run)"] == f"{FRESH_HEADLINE} (at smoke)"
    assert row["headline claim at the claim preset (reference)"] == "no reference yet (claim preset cpu)"
    assert row["works claim (reference)"] == "—"
    assert row["wall time: fresh / reference"] == "0.2 min / —"
    assert "Fresh run and committed reference" not in md
    assert "no reference yet (claim preset cpu)" in html_path.read_text()


def test_summary_of_run_without_works_claim_says_so(tmp_path):
    run = tmp_path / "run"
    _make_run(run)  # no works claim
    md_path, _ = render([run], tmp_path / "out", references={})
    row = dict(zip(*_section_table(md_path.read_text(), "## Summary")[:2]))
    assert row["works claim (fresh run)"] == "no works claim yet"
    assert row["headline claim (fresh run)"].startswith("moe_beats_dense_active: -1 [-1.248, -0.7516] (3 seeds)")


def test_summary_has_one_row_per_known_recipe(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _fresh_run(a)
    _make_run(b, recipe="not_a_recipe")
    md_path, _ = render([a, b], tmp_path / "out", references={})
    table = _section_table(md_path.read_text(), "## Summary")
    assert [r[0] for r in table[1:]] == ["glam"]


def test_a_claim_cell_counts_seeds_or_bootstrap_units():
    from thrifty.core.report import claim_cell

    seeded = {"id": "a", "measured": 1.0, "ci95": [0.5, 1.5], "seeds": [0, 1, 2], "holds": True, "kind": "paired"}
    assert claim_cell(seeded).endswith("(3 seeds) — holds")
    tau = {**seeded, "id": "tau", "seeds": list(range(12)), "kind": "statistic", "holds": False}
    assert "(12 units, bootstrap) — does not hold" in claim_cell(tau)
