"""``thrifty`` command line: list | show-config | run | reproduce | report | score.

Exit codes: 0 success; 1 a run failed; 2 bad usage, unknown recipe or invalid config; 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# `reproduce --budget` values that mean "each recipe's own claim preset"
CLAIM_BUDGETS = ("claim", "cpu")

EPILOG_RUN = """\
overrides are dotted key=value pairs applied after the preset, e.g.
  thrifty run glam --preset smoke arms=[moe] max_steps=50 moe.num_experts=4 out_dir=/tmp/runs
lists use brackets; `thrifty show-config RECIPE` prints every key with its value.
Under torchrun the same command trains with DDP:
  torchrun --nproc_per_node=2 -m thrifty run glam --preset smoke
Recipes with independent units (temporal_gradient, data_assemble) train several at once with workers=N:
  thrifty run temporal_gradient --preset cpu workers=4 num_threads=8
"""


def _parser() -> argparse.ArgumentParser:
    from thrifty import __version__
    from thrifty.core.config import PRESETS

    p = argparse.ArgumentParser(
        prog="thrifty",
        description="Run faithful miniatures of label- and compute-thrifty deep-learning systems, and their "
        "paper-scale configurations.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"thrifty {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser(
        "list", help="list the recipes, their papers, whether they are implemented, their presets and claim preset"
    )

    sc = sub.add_parser(
        "show-config",
        help="print a recipe's resolved config as YAML",
        epilog=EPILOG_RUN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sc.add_argument("recipe", help="recipe name (see `thrifty list`)")
    sc.add_argument("--preset", default="quick", help="preset name (default: quick)")
    sc.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. max_steps=100")

    run = sub.add_parser(
        "run",
        help="run one recipe end to end and write its results and report",
        epilog=EPILOG_RUN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("recipe", help="recipe name (see `thrifty list`)")
    run.add_argument(
        "--preset",
        default="quick",
        help=f"budget preset: {', '.join(PRESETS)} or a recipe's own (default: quick, <= 5 min on 2 CPU cores)",
    )
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. seeds=[0,1]")

    rep = sub.add_parser(
        "reproduce",
        help="run recipes at one budget and write one combined report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="with no recipe named, every implemented recipe runs.\n"
        "  thrifty reproduce                  # all, quick budget\n"
        "  thrifty reproduce --budget claim   # every claim preset (pre-registered, 5 seeds, <= 45 min each)\n"
        "  thrifty reproduce glam --budget smoke\n"
        "The report opens with a summary of every recipe's works and headline claims, the fresh run beside\n"
        "the committed reference result of its claim preset (docs/<recipe>/reference/).",
    )
    rep.add_argument("recipes", nargs="*", metavar="RECIPE")
    rep.add_argument(
        "--budget",
        default="quick",
        help=f"preset for every recipe: {', '.join(PRESETS)} (default: quick); `claim` runs each recipe's "
        "pre-registered claim preset (see `thrifty list`), where its headline claims are judged, skipping recipes "
        "without one; `cpu` runs the claim preset where a recipe has one and its cpu preset otherwise",
    )
    rep.add_argument("--out-dir", default="runs", help="root of run directories and of report/ (default: runs)")

    ref = sub.add_parser(
        "reference",
        help="publish a finished claim-preset run as the recipe's committed reference, or check the references",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="  thrifty reference runs/glam/cpu      # copy results + figures to docs/glam/reference/, log the run\n"
        "  thrifty reference --check            # every committed reference is well-formed and consistent",
    )
    ref.add_argument("run_dir", nargs="?", type=Path, metavar="RUN_DIR", help="a finished claim-preset run")
    ref.add_argument("--docs-dir", type=Path, default=None, help="where docs/<recipe>/ live (default: the repo's)")
    ref.add_argument("--no-log", action="store_true", help="do not append a line to docs/<recipe>/claims_log.md")
    ref.add_argument("--check", action="store_true", help="check every committed reference instead")

    rp = sub.add_parser("report", help="render report.md and report.html from run directories")
    rp.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    rp.add_argument(
        "--out", type=Path, default=None, help="output directory (default: the single run dir, or ./report)"
    )

    sp = sub.add_parser(
        "score",
        help="score new images or exams with a trained model (a CSV of scores or per-label probabilities)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="recipes with a scoring API: squid, data_assemble, mt_transunet, pe_cad\n"
        "  thrifty score squid --checkpoint runs/squid/quick/units/squid/seed0 xray1.png xray2.jpeg --out scored/\n"
        "  thrifty score data_assemble --checkpoint runs/data_assemble/quick/units/assemble/seed0 xrays/ --out probs/\n"
        "  thrifty score mt_transunet --checkpoint runs/mt_transunet/quick/units/seg+cls+dual/seed0 lesions/ "
        "--out lesions_scored/\n"
        "  thrifty score pe_cad --checkpoint runs/pe_cad/quick/units/stage2/cc/seed0 exams/<study>/<series>/ "
        "--out exams_scored/\n"
        "    (pe_cad: DICOM exam folders, or folders above them; exams.csv + slices.csv, features cached)",
    )
    sp.add_argument("recipe", help="recipe name (see `thrifty list`)")
    sp.add_argument(
        "images", nargs="+", type=Path, metavar="IMAGE",
        help="image files (png, jpeg, bmp, tiff); data_assemble and mt_transunet also take folders; pe_cad takes "
        "DICOM exam folders",
    )  # fmt: skip
    sp.add_argument(
        "--checkpoint", required=True, type=Path, help="a trained unit directory (<run>/units/<arm>/seed<k>)"
    )
    sp.add_argument("--out", type=Path, default=Path("scored"), help="output directory (default: ./scored)")
    sp.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable images (listed in the CSV) instead of failing"
    )
    return p


def _setup_logging(verbose: bool, quiet: bool) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
        force=True,
    )
    for noisy in ("matplotlib", "PIL", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _print_claims(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from thrifty.core.report import CLAIM_COLUMNS, claim_rows

    rows = claim_rows({**results, "recipe": results.get("recipe", "?")})
    table = Table(title=f"{results.get('recipe')} claims (preset {results.get('preset')})", show_lines=True)
    keep = [1, 4, 5, 6, 7, 9]
    longest_id = max((len(r[1]) for r in rows), default=5)
    for i in keep:  # claim ids are never cut (a user greps results.json for them); numbers wrap instead
        table.add_column(CLAIM_COLUMNS[i], no_wrap=i == 1, min_width=longest_id if i == 1 else None, overflow="fold")
    for r in rows:
        style = "green" if r[9] == "holds" else "red"
        table.add_row(*[r[i] for i in keep], style=style)
    Console().print(table)


def cmd_list() -> int:
    from rich.console import Console
    from rich.table import Table

    from thrifty.core.config import available_presets
    from thrifty.core.registry import RECIPES

    # Names a user copies (recipes, presets) are never cut, at any width and when piped: their columns
    # are as wide as the longest name and wrap only between names; the papers follow as plain lines.
    table = Table(title="thrifty recipes")
    longest_preset = max((len(p) for r in RECIPES for p in available_presets(r.name)), default=8)
    table.add_column("recipe", no_wrap=True, min_width=max(len(r.name) for r in RECIPES))
    table.add_column("status", no_wrap=True)
    table.add_column("claim preset", no_wrap=True, min_width=longest_preset)
    table.add_column("presets", min_width=longest_preset + 1)
    table.add_column("domain")
    for r in RECIPES:
        presets = ", ".join(available_presets(r.name)) if r.ready else ""
        claim = (r.claim_preset or "not yet") if r.ready else ""
        table.add_row(r.name, "ready" if r.ready else "planned", claim, presets, r.domain)
    console = Console()
    console.print(table)
    console.print(
        "claim preset: where a recipe's headline claims are judged (pre-registered, 5 seeds, <= 45 min on 2 cores)\n"
    )
    for r in RECIPES:
        console.print(f"{r.name}: {r.title} (arXiv {r.arxiv})", highlight=False)
    return EXIT_OK


def cmd_show_config(recipe: str, preset: str, overrides: list[str]) -> int:
    from thrifty.core.config import to_yaml
    from thrifty.core.registry import get, load_config

    _, cfg = load_config(recipe, preset, overrides)
    claim_preset = get(recipe).claim_preset
    if preset == claim_preset:
        print(f"# preset {preset}: {recipe}'s CLAIM PRESET (its headline claims are judged at this preset)")
    elif claim_preset is None:
        print(f"# preset {preset}; {recipe} has no pre-registered claim preset yet")
    else:
        print(
            f"# preset {preset}; {recipe}'s claim preset is {claim_preset} (thrifty show-config {recipe} "
            f"--preset {claim_preset})"
        )
    print(to_yaml(cfg), end="")
    return EXIT_OK


def run_recipe(recipe: str, preset: str, overrides: list[str]) -> dict[str, Any]:
    """Resolve the config, run the recipe and render its report into the run directory."""
    from thrifty.core.registry import load_config
    from thrifty.core.report import render
    from thrifty.core.run import tune_allocator

    tune_allocator()
    module, cfg = load_config(recipe, preset, overrides)
    results = module.train(cfg)
    if results.get("run_dir"):  # empty on non-zero DDP ranks
        render([Path(results["run_dir"])], Path(results["run_dir"]), title=f"thrifty {recipe} ({preset})")
    return results


def cmd_run(recipe: str, preset: str, overrides: list[str]) -> int:
    results = run_recipe(recipe, preset, overrides)
    if results.get("run_dir"):  # empty on non-zero DDP ranks
        _print_claims(results)
        print(f"results: {results['run_dir']}/results.json  report: {results['run_dir']}/report.html")
    return EXIT_OK


def cmd_reproduce(recipes: list[str], budget: str, out_dir: str) -> int:
    from thrifty.core import registry
    from thrifty.core.config import preset_path
    from thrifty.core.report import render

    names = recipes or registry.names(ready_only=True)
    if budget in CLAIM_BUDGETS:
        # `cpu` keeps meaning the cpu preset for a recipe without a pre-registered claim preset; `claim` skips it
        missing = [n for n in names if registry.get(n).claim_preset is None]
        if budget == "cpu":  # a recipe with neither a claim preset nor a cpu preset has nothing to run at `cpu`
            from thrifty.core.config import available_presets

            no_cpu = [n for n in missing if "cpu" not in available_presets(n)]
            if no_cpu:
                logging.getLogger("thrifty").warning("no claim preset and no cpu preset yet (skipped): %s",
                                                     ", ".join(no_cpu))  # fmt: skip
            names = [n for n in names if n not in no_cpu]
            missing = [n for n in missing if n not in no_cpu]
        if missing:
            what = "skipped" if budget == "claim" else "run at their cpu preset"
            logging.getLogger("thrifty").warning("no claim preset yet (%s): %s", what, ", ".join(missing))
        if budget == "claim":
            names = [n for n in names if n not in missing]
        if not names:
            print("thrifty: error: none of these recipes has a claim preset yet", file=sys.stderr)
            return EXIT_USAGE
    presets = {n: (registry.get(n).claim_preset or budget) if budget in CLAIM_BUDGETS else budget for n in names}
    for n in names:  # fail fast on typos before hours of work
        registry.get(n).load()
        preset_path(n, presets[n])
    done, failed = [], []
    for i, name in enumerate(names, 1):
        preset = presets[name]
        logging.getLogger("thrifty").info("[%d/%d] reproducing %s at %s", i, len(names), name, preset)
        try:
            res = run_recipe(name, preset, [f"out_dir={out_dir}", f"run_name={preset}"])
            done.append(Path(res["run_dir"]))
        except KeyboardInterrupt:
            raise
        except Exception as err:  # one recipe failing must not hide the others' results
            failed.append(name)
            logging.getLogger("thrifty").error("%s failed: %s", name, err)
            traceback.print_exc()
    if done:
        md, page = render(done, Path(out_dir) / "report", title=f"thrifty reproduce ({budget})")
        print(f"report: {page}  (markdown: {md})")
    if failed:
        print(f"failed recipes: {', '.join(failed)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_reference(run_dir: Path | None, docs_dir: Path | None, no_log: bool, check: bool) -> int:
    from thrifty.core import reference, registry

    if check == (run_dir is not None):
        print("thrifty: error: give either RUN_DIR or --check", file=sys.stderr)
        return EXIT_USAGE
    if check:
        problems, checked = [], 0
        for r in registry.RECIPES:
            try:
                data = reference.load_reference(r.name)
            except reference.ReferenceError as err:  # one unreadable reference must not hide the others
                checked += 1
                problems.append(str(err))
                continue
            if data is not None:
                checked += 1
                problems += reference.check_reference(data, source=f"{data['_run_dir']}/results.json")
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{checked} reference(s) checked, {len(problems)} problem(s)")
        return EXIT_FAILED if problems else EXIT_OK
    out = reference.publish(run_dir, docs_dir=docs_dir, log=not no_log)
    print(f"reference: {out}" + ("" if no_log else f"  log: {out.parent / reference.LOG_NAME}"))
    return EXIT_OK


def cmd_report(run_dirs: list[Path], out: Path | None) -> int:
    from thrifty.core.report import render

    target = out or (run_dirs[0] if len(run_dirs) == 1 else Path("report"))
    md, page = render(run_dirs, target)
    print(f"report: {page}  (markdown: {md})")
    return EXIT_OK


def _data_errors() -> tuple[type[Exception], ...]:
    """Data and scoring errors: a clear message, exit 1. Imported only once an exception is being matched
    (an ``except`` tuple is evaluated lazily), so ``thrifty list`` does not pay for importing torch."""
    from thrifty.data.digit_anatomy import DigitAnatomyError
    from thrifty.data.images import ImageDataError
    from thrifty.data.video import VideoDataError
    from thrifty.data.volumes import VolumeError
    from thrifty.methods.data_assemble.score import ScoringError as AssembleScoringError
    from thrifty.methods.mt_transunet.score import ScoringError as LesionScoringError
    from thrifty.methods.pe_cad.score import ScoringError as ExamScoringError
    from thrifty.methods.squid.score import ScoringError

    return (DigitAnatomyError, ImageDataError, ScoringError, AssembleScoringError, LesionScoringError,
            ExamScoringError, VideoDataError, VolumeError)  # fmt: skip


def cmd_score(recipe: str, checkpoint: Path, images: list[Path], out: Path, skip_bad: bool) -> int:
    import importlib

    from thrifty.core.registry import RecipeNotReady, get

    rec = get(recipe)
    name = f"thrifty.methods.{rec.name}.score"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name not in (name, f"thrifty.methods.{rec.name}"):
            raise  # a missing dependency, not a missing scoring API
        raise RecipeNotReady(
            f"recipe {recipe!r} has no scoring API (recipes with one: squid, data_assemble, mt_transunet, pe_cad)"
        ) from None
    csv_path = module.score_files(checkpoint, images, out, skip_bad=skip_bad)
    outputs = (("heatmaps", "heat-maps"), ("masks", "masks"), ("slices.csv", "per-slice"))
    extras = [f"  {what}: {csv_path.parent / name}" for name, what in outputs
              if (csv_path.parent / name).exists()]  # fmt: skip
    print(f"scores: {csv_path}" + "".join(extras))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may follow options (`run glam --preset smoke k=v`), which argparse's positional
    # matching does not allow; collect them from the unparsed rest.
    args, rest = parser.parse_known_args(argv)
    if rest:
        if args.command in ("run", "show-config") and all("=" in r and not r.startswith("-") for r in rest):
            args.overrides = [*args.overrides, *rest]
        else:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    _setup_logging(args.verbose, args.quiet)

    from thrifty.core.checkpoint import CheckpointError
    from thrifty.core.config import ConfigError
    from thrifty.core.reference import ReferenceError
    from thrifty.core.registry import RecipeNotReady, UnknownRecipe
    from thrifty.core.report import ReportError
    from thrifty.data.text import CorpusError

    try:
        if args.command == "list":
            return cmd_list()
        if args.command == "show-config":
            return cmd_show_config(args.recipe, args.preset, args.overrides)
        if args.command == "run":
            return cmd_run(args.recipe, args.preset, args.overrides)
        if args.command == "reproduce":
            return cmd_reproduce(args.recipes, args.budget, args.out_dir)
        if args.command == "report":
            return cmd_report(args.run_dirs, args.out)
        if args.command == "reference":
            return cmd_reference(args.run_dir, args.docs_dir, args.no_log, args.check)
        if args.command == "score":
            return cmd_score(args.recipe, args.checkpoint, args.images, args.out, args.skip_bad)
    except (UnknownRecipe, RecipeNotReady, ConfigError) as err:
        print(f"thrifty: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (CorpusError, CheckpointError, ReportError, ReferenceError, *_data_errors()) as err:
        print(f"thrifty: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("thrifty: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    parser.print_help()
    return EXIT_USAGE
