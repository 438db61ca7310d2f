"""Markdown and self-contained HTML reports built from runs' ``results.json``.

The report puts each claim's paper value beside our measurement, its 95% interval, the number of
seeds, the preset it was measured at and the computed verdict; then each run's tables, cost and
figures. The HTML page embeds the figures (base64 PNG) so it can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from thrifty.core.run import atomic_write_text, is_inside


class ReportError(RuntimeError):
    pass


def load_results(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise ReportError(f"{run_dir} has no results.json (is it a finished run directory?)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path} is not valid JSON: {err}") from None
    data["_run_dir"] = str(Path(run_dir))
    return data


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "—"
        return f"{v:.{digits}g}"
    return str(v)


def _ci(ci: Any) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return "undefined (1 seed)"
    return f"[{_num(ci[0])}, {_num(ci[1])}]"


def claim_rows(run: dict[str, Any]) -> list[list[str]]:
    rows = []
    for c in run.get("claims", []):
        side = "<" if c["direction"] == "less" else ">"
        rows.append(
            [
                run["recipe"],
                c["id"],
                c["statement"],
                _num(c["paper_value"]),
                f"{_num(c['measured'])} {c.get('unit', '')}".strip(),
                _ci(c["ci95"]),
                f"{side} {_num(c['threshold'])}",
                str(len(c.get("seeds", []))),
                c.get("preset", ""),
                "holds" if c["holds"] else "does not hold",
            ]
        )
    return rows


CLAIM_COLUMNS = [
    "recipe",
    "claim",
    "statement",
    "paper",
    "measured",
    "95% CI",
    "claimed side",
    "seeds",
    "preset",
    "verdict",
]


def _md_table(columns: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return _num(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(columns: list[str], rows: list[list[Any]], verdict_col: int | None = None) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cells = []
        for i, v in enumerate(r):
            cls = ""
            if verdict_col is not None and i == verdict_col:
                cls = ' class="ok"' if v == "holds" else ' class="bad"'
            cells.append(f"<td{cls}>{html.escape(_num(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _cost_rows(run: dict[str, Any]) -> list[list[Any]]:
    cost = run.get("cost", {})
    rows: list[list[Any]] = [
        ["wall time (s)", round(cost.get("wall_time_s", float("nan")), 1)],
        ["peak RSS (MiB)", round(cost.get("peak_rss_mb", float("nan")), 1)],
    ]
    for k, v in cost.items():
        if k in ("wall_time_s", "peak_rss_mb"):
            continue
        if isinstance(v, dict):
            rows += [[f"{k} [{kk}]", round(vv, 1) if isinstance(vv, float) else vv] for kk, vv in v.items()]
        else:
            rows.append([k, v])
    return rows


def claim_cell(c: dict[str, Any] | None, *, sep: str = " — ") -> str:
    """``id: measured [lo, hi] (n seeds){sep}verdict`` of one claim record (a dash for none), for the
    report's tables and the claims log; a ``statistic`` claim counts its bootstrap units instead of seeds."""
    if c is None:
        return "—"
    verdict = "holds" if c.get("holds") else "does not hold"
    n = len(c.get("seeds", []))
    units = "units, bootstrap" if c.get("kind") == "statistic" else "seeds"  # e.g. Kendall τ over architectures
    return f"{c['id']}: {_num(c['measured'])} {_ci(c['ci95'])} ({n} {units}){sep}{verdict}"


def _label(run: dict[str, Any]) -> str:
    """``preset cpu, 5 seeds, commit abc1234, 2026-12-05`` for a run or a reference."""
    prov = run.get("reference") or {}
    env = run.get("environment", {})
    seeds = prov.get("seeds") or run.get("config", {}).get("seeds") or []
    commit = str(prov.get("commit") or env.get("commit") or "unknown")[:10]
    date = str(prov.get("date") or run.get("created") or "")[:10]
    return f"preset {run.get('preset')}, {len(seeds)} seeds, commit {commit}" + (f", {date}" if date else "")


def _wall(run: dict[str, Any] | None) -> str:
    if not run:
        return "—"
    w = run.get("cost", {}).get("wall_time_s")
    return "—" if not isinstance(w, int | float) else f"{w / 60:.1f} min"


def summary_rows(runs: list[dict[str, Any]], references: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row per recipe: works claim and headline claim of the fresh run and of the committed reference."""
    from thrifty.core.registry import UnknownRecipe, get

    rows = []
    for run in runs:
        try:
            recipe = get(run["recipe"])
        except UnknownRecipe:
            continue
        ref = references.get(run["recipe"])

        def works(r: dict[str, Any] | None) -> dict[str, Any] | None:
            return next((c for c in (r or {}).get("claims", []) if c.get("kind") == "works"), None)

        rows.append(
            [
                run["recipe"],
                f"{claim_cell(works(run))} (at {run.get('preset')})" if works(run) else "no works claim yet",
                claim_cell(recipe.headline_claim(run.get("claims", []))) + f" (at {run.get('preset')})",
                (claim_cell(recipe.headline_claim(ref.get("claims", []))) + f" ({_label(ref)})")
                if ref
                else (
                    f"no reference yet (claim preset {recipe.claim_preset})"
                    if recipe.claim_preset
                    else "no claim preset yet"
                ),
                (claim_cell(works(ref)) if ref else "—"),
                f"{_wall(run)} / {_wall(ref)}",
            ]
        )
    return rows


SUMMARY_COLUMNS = [
    "recipe",
    "works claim (fresh run)",
    "headline claim (fresh run)",
    "headline claim at the claim preset (reference)",
    "works claim (reference)",
    "wall time: fresh / reference",
]


def comparison_rows(run: dict[str, Any], ref: dict[str, Any]) -> list[list[str]]:
    """Each claim id of the fresh run or the reference, with both measurements side by side."""
    fresh = {c["id"]: c for c in run.get("claims", [])}
    refd = {c["id"]: c for c in ref.get("claims", [])}
    ids = list(fresh) + [i for i in refd if i not in fresh]
    return [[i, claim_cell(fresh.get(i)), claim_cell(refd.get(i))] for i in ids]


def _references_for(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    from thrifty.core.reference import ReferenceError, load_reference

    out = {}
    for run in runs:
        try:
            ref = load_reference(run["recipe"])
        except ReferenceError as err:  # a broken reference must not hide the fresh results
            ref = None
            run.setdefault("notes", []).append(f"reference not shown: {err}")
        if ref is not None:
            out[run["recipe"]] = ref
    return out


def _is_same(run: dict[str, Any], ref: dict[str, Any]) -> bool:
    """The run being reported is the committed reference itself."""
    return Path(ref["_run_dir"]).resolve() == Path(run["_run_dir"]).resolve()


def render(
    run_dirs: list[Path],
    out_dir: Path,
    *,
    title: str = "thrifty report",
    references: dict[str, dict[str, Any]] | None = None,
) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` for the given runs into ``out_dir``.

    The report opens with one summary row per recipe (works claim, headline claim of the fresh run and
    of the committed reference at the recipe's claim preset, wall times), then every claim of the fresh
    runs, then per recipe the fresh run and its reference side by side, tables, cost and figures.

    Args:
        references: committed reference results per recipe (``results.json`` content with ``_run_dir``);
            ``None`` loads each recipe's from ``docs/<recipe>/reference/``.
    """
    runs = [load_results(Path(d)) for d in run_dirs]
    refs = _references_for(runs) if references is None else references
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    all_claims = [row for run in runs for row in claim_rows(run)]
    held = sum(1 for r in all_claims if r[-1] == "holds")
    summary = summary_rows(runs, refs)
    intro = (
        "A claim holds only when its whole 95% interval lies on the claimed side; comparisons are paired "
        "differences over seeds measured on a test split touched once. Headline claims are judged at each "
        "recipe's claim preset (5 seeds); the reference column is that run, committed with the code."
    )

    md = [
        f"# {title}",
        "",
        f"Generated {stamp}. {held} of {len(all_claims)} claims of the fresh runs hold.",
        "",
        intro,
        "",
        "## Summary",
        "",
        _md_table(SUMMARY_COLUMNS, summary),
        "",
        "## Claims (fresh runs)",
        "",
        _md_table(CLAIM_COLUMNS, all_claims),
        "",
    ]
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Generated {stamp}. <b>{held} of {len(all_claims)}</b> claims of the fresh runs hold. "
        f"{html.escape(intro)}</p>",
        "<h2>Summary</h2>",
        _html_table(SUMMARY_COLUMNS, summary),
        "<h2>Claims (fresh runs)</h2>",
        _html_table(CLAIM_COLUMNS, all_claims, verdict_col=len(CLAIM_COLUMNS) - 1),
    ]

    for run in runs:
        run_dir = Path(run["_run_dir"])
        shown = os.path.relpath(run_dir, out_dir)  # relative to the report, so the report holds no machine path
        paper = run.get("paper", {})
        arxiv = paper.get("arxiv", "?")
        head = f"{run['recipe']} — {paper.get('title', '')} (arXiv {arxiv}), preset `{run.get('preset')}`"
        md += [f"## {head}", "", f"Run directory: `{shown}`", ""]
        body += [
            f"<h2>{html.escape(head.replace('`', ''))}</h2>",
            f"<p>Run directory: <code>{html.escape(shown)}</code></p>",
        ]
        ref = refs.get(run["recipe"])
        if ref is not None and _is_same(run, ref):
            ref = None  # reporting the reference itself: nothing to set beside it
        if ref is not None:
            cols = ["claim", f"fresh run ({_label(run)})", f"reference ({_label(ref)})"]
            prov = ref.get("reference", {})
            where = (
                f"Reference: `{os.path.relpath(ref['_run_dir'], out_dir)}`, "
                f"produced on {prov.get('processor', '?')} with "
                f"{prov.get('threads', '?')} threads in {_wall(ref)}, peak RSS "
                f"{_num(prov.get('peak_rss_mb'))} MiB."
            )
            md += [
                "### Fresh run and committed reference",
                "",
                where,
                "",
                _md_table(cols, comparison_rows(run, ref)),
                "",
            ]
            body += [
                "<h3>Fresh run and committed reference</h3>",
                f"<p>{html.escape(where.replace('`', ''))}</p>",
                _html_table(cols, comparison_rows(run, ref)),
            ]
        for table in run.get("tables", []):
            md += [f"### {table['title']}", "", _md_table(table["columns"], table["rows"]), ""]
            body += [f"<h3>{html.escape(table['title'])}</h3>", _html_table(table["columns"], table["rows"])]
        md += ["### Cost", "", _md_table(["what", "value"], _cost_rows(run)), ""]
        body += ["<h3>Cost</h3>", _html_table(["what", "value"], _cost_rows(run))]
        for note in run.get("notes", []):
            md += [f"> {note}", ""]
            body += [f"<p class='note'>{html.escape(note)}</p>"]
        figs = [(run_dir, rel, "") for rel in run.get("figures", [])]
        if ref is not None:
            figs += [
                (Path(ref["_run_dir"]), rel, f" (reference, preset {ref.get('preset')})")
                for rel in ref.get("figures", [])
            ]
        for base, rel, tag in figs:
            fig = base / rel
            # only files inside the run directory: a results.json must not pull other files into the page
            if not is_inside(base, rel) or not fig.is_file():
                continue
            md += [f"![{rel}{tag}]({os.path.relpath(fig, out_dir)})", ""]
            data = base64.b64encode(fig.read_bytes()).decode()
            body += [
                f"<figure><img alt='{html.escape(rel + tag)}' src='data:image/png;base64,{data}'/>"
                f"<figcaption>{html.escape(rel + tag)}</figcaption></figure>"
            ]

    style = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left;vertical-align:top}th{background:#f3f3f3}.ok{background:#e3f6e3}.bad{background:#fbe4e4}"
        "img{max-width:100%;border:1px solid #eee}figure{display:inline-block;margin:0.5em;max-width:48%}"
        ".note{color:#555;font-style:italic}"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>"
    )
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(md_path, "\n".join(md) + "\n")
    atomic_write_text(html_path, page)
    return md_path, html_path
