"""The ``wsss`` command.

Sub-commands are contributed by the modules that own them (each exposes
``add_commands(subparsers)``); imports happen lazily so ``wsss data info`` does not pay for
Prefect or MLflow. The CLI is the application's entry point, so it may reach into
``stages`` and ``flows``; nothing in ``pipeline`` else does.
"""

import argparse
import importlib
import json
import sys

from pipeline.config import ConfigError, config_to_dict, load_config
from pipeline.errors import DiskFullError, InputError

# modules contributing sub-commands; a missing optional one is skipped
COMMAND_MODULES = ("pipeline.data.commands", "pipeline.cli_run", "pipeline.cli_plan", "pipeline.cli_predict",
                   "pipeline.cli_export", "flows.cli")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` (preset or file) and repeated ``--set section.field=value``."""
    parser.add_argument("--config", "-c", default="demo",
                        help="preset name (voc, coco, demo, voc-mini) or a YAML/JSON file (default: demo)")
    parser.add_argument("--set", "-s", dest="overrides", action="append", default=[],
                        metavar="FIELD=VALUE", help="dotted override, e.g. crf.iterations=5 (repeatable)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of input and disk errors (default: one line)")


def config_from_args(args: argparse.Namespace):
    return load_config(args.config, args.overrides)


def key_prefixes() -> set[str]:
    """Dotted fields (or whole sections) some stage's cache key hashes (``stages.stage_config``
    of the default config): everything else only says how a stage runs."""
    from pipeline.config import PipelineConfig
    from stages import STAGE_ORDER, stage_config

    out: set[str] = set()
    for name in STAGE_ORDER:
        for section, value in stage_config(PipelineConfig(), name).items():
            if isinstance(value, dict):
                out.update(f"{section}.{k}" for k in value)
            else:
                out.add(section)
    return out


def config_reference() -> str:
    """The text of docs/configuration.md (``wsss config --reference``)."""
    from pipeline.config_docs import reference

    return reference(key_prefixes())


def _cmd_config(args: argparse.Namespace) -> int:
    if args.reference:
        print(config_reference(), end="")
        return 0
    print(json.dumps(config_to_dict(config_from_args(args)), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsss", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of input and disk errors (default: one line)")
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("config", help="print the resolved configuration as JSON")
    add_config_arguments(show)
    show.add_argument("--reference", action="store_true",
                      help="print the configuration reference (Markdown: every field, type, default, "
                           "description) instead; docs/configuration.md is its output")
    show.set_defaults(func=_cmd_config)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                continue
            raise
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a sub-command. Bad input (config, dataset or stage input files) prints one line
    and exits 2; a full disk prints one line and exits 1; ``--debug`` re-raises instead."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, InputError, DiskFullError) as err:
        if args.debug:
            raise
        print(f"wsss: {err}", file=sys.stderr)
        return 1 if isinstance(err, DiskFullError) else 2


if __name__ == "__main__":
    sys.exit(main())
