"""``wsss plan``: validate the data and project each stage's time, memory and disk on this
device before a long run (:mod:`stages.plan`)."""

import argparse

from pipeline.cli import add_config_arguments, config_from_args


def _cmd_plan(args: argparse.Namespace) -> int:
    from stages import plan

    config = config_from_args(args)
    stages = args.stages.split(",") if args.stages else None
    summary, estimates = plan.make_estimates(config, samples=args.samples, stages=stages)
    print(plan.format_plan(summary, estimates))
    plan.check_fits(config, estimates)
    print("[wsss] plan: the run fits this machine's disk and memory")
    return 0


def add_commands(sub) -> None:
    parser = sub.add_parser("plan", help="dry run: validate the data, time a sample of each stage on "
                                         "this device, project time / memory / disk")
    add_config_arguments(parser)
    parser.add_argument("--samples", type=int, default=2, help="timed steps per stage after a warm-up")
    parser.add_argument("--stages", default="", help="comma-separated subset (default: all five)")
    parser.set_defaults(func=_cmd_plan)
