"""The `mera` command. Each sub-command lives in its own module with a `register(subparsers)`."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from mera_ds.errors import MeraError

# Modules under mera_ds.cli, each adding its sub-commands; imported lazily so `mera --help` is fast.
COMMANDS = ["config", "shards", "run", "stage", "merge", "report", "bench"]


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """--run and --ray-address: where a run's artifacts go and which cluster runs it."""
    p.add_argument("--run", help="run directory (default: the config's run_dir)")
    p.add_argument("--ray-address", help="Ray cluster (default: RAY_ADDRESS or a local instance)")


def run_config(args):
    """The run config of `args.config` with --run and --ray-address applied."""
    from mera_ds.config import absolute, load_config

    cfg = load_config(args.config)
    update = {"run_dir": absolute(args.run)} if args.run else {}
    if args.ray_address:
        update["cluster"] = cfg.cluster.model_copy(update={"ray_address": args.ray_address})
    return cfg.model_copy(update=update)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mera", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"mera_ds.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except MeraError as e:
        # Bad input is the user's to fix: one line, no traceback.
        print(f"mera: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
