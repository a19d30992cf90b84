"""``wsss run``: the pipeline's stages called directly, without Prefect."""

import argparse
import time

from pipeline.cli import add_config_arguments, config_from_args


def format_table(rows: list[list[str]]) -> str:
    """Rows of strings as left-aligned columns (the first row is the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def format_summary(results) -> str:
    """A table: stage, key, cached?, duration, headline metric."""
    rows = [("stage", "key", "cached", "seconds", "headline")]
    for r in results:
        headline = r.metrics.get("headline")
        if headline is None:
            numeric = [(k, v) for k, v in r.metrics.items() if isinstance(v, (int, float))]
            headline = f"{numeric[0][0]}={numeric[0][1]:.4g}" if numeric else ""
        rows.append((r.stage, r.key, "yes" if r.cached else "no", f"{r.duration_s:.1f}", str(headline)))
    return format_table(rows)


def _cmd_run(args: argparse.Namespace) -> int:
    """The stages in this process, with one progress bar (or, off a terminal, plain progress
    lines) per computed stage, a line per stage end or cache hit, then the summary table."""
    from flows.progress import TerminalStages
    from pipeline.console import Console
    from stages import check_run_inputs, run_pipeline

    if getattr(args, "skip_missing", False):
        args.overrides.append("crf.skip_missing=true")
    config = config_from_args(args)
    stages = args.stages.split(",") if args.stages else None
    start = time.time()
    with Console() as console:
        checked = check_run_inputs(config, stages, force=args.force, decode=args.validate)
        if checked:
            console.say(f"inputs {'decoded' if args.validate else 'checked'} in {time.time() - start:.1f}s: "
                        f"split(s) {', '.join(checked)}")
        view = TerminalStages(console)
        results = run_pipeline(config, stages=stages, force=args.force, on_result=view.end, say=console.say,
                               on_start=lambda name, out_dir, reuse, tracker:
                                   view.wrap(name, config, out_dir, reuse, tracker))
    print(format_summary(results.values()))
    print(f"total {time.time() - start:.1f}s")
    return 0


def add_commands(sub) -> None:
    run = sub.add_parser("run", help="run pipeline stages directly (no Prefect)")
    add_config_arguments(run)
    run.add_argument("--stages", default="", help="comma-separated subset (default: all five)")
    run.add_argument("--force", action="store_true", help="recompute the selected stages")
    run.add_argument("--validate", action="store_true",
                     help="decode every image and mask the run will read before starting (as `wsss "
                          "data info`); without it only their existence and headers are checked")
    run.add_argument("--skip-missing", action="store_true",
                     help="stage 3: skip (and count) images without a map file instead of failing")
    run.set_defaults(func=_cmd_run)
