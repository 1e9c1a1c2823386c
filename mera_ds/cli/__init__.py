"""The `mera` command. Each sub-command lives in its own module with a `register(subparsers)`."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from mera_ds.errors import MeraError

EXECUTORS = ("ray", "local")


def add_set_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set a config field over the file's, e.g. --set stages.finetune.lora=null "
                        "(a dotted path, list items by index; the value in YAML; repeatable)")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """--run, --executor, --ray-address and --set: where a run's artifacts go, what runs its
    steps, and config fields set over the file's."""
    p.add_argument("--run", help="run directory (default: the config's run_dir)")
    p.add_argument("--executor", choices=EXECUTORS, default="ray",
                   help="ray: training steps as Ray Train jobs, the rest as Ray tasks (default); "
                        "local: in this process, on one device (`mera stage` of a training "
                        "phase also in every rank of a deepspeed/torchrun launch)")
    p.add_argument("--ray-address", help="Ray cluster (default: RAY_ADDRESS or a local instance)")
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="training steps between resume checkpoints (default: a quarter of "
                        "the job; 0: none)")
    add_set_argument(p)


def execute_steps(args, cfg, steps, resume: bool):
    """Run `steps` of the run in cfg.run_dir with the executor of --executor, recording them in
    the run's manifest; returns the manifest (results, and timings of the steps run now)."""
    from mera_ds.run.layout import RunLayout
    from mera_ds.run.local import execute, run_step
    from mera_ds.run.manifest import Manifest
    from mera_ds.run.preflight import preflight

    on_ray = args.executor == "ray"
    preflight(cfg, steps, None if on_ray else int(os.environ.get("WORLD_SIZE", 1)),
              cfg.cluster.ray_address if on_ray else None)
    manifest = Manifest.open(RunLayout.of(cfg), cfg, "mera", resume)
    if not on_ray:
        def executor(c, step):
            return run_step(c, step, args.checkpoint_every)
    else:
        from mera_ds.cluster.executor import RayExecutor

        executor = RayExecutor(args.checkpoint_every)
    execute(cfg, steps, manifest, executor,
            concurrent=on_ray and cfg.cluster.schedule == "dependency")
    return manifest


def run_config(args):
    """The run config of `args.config` with --set, --run and --ray-address applied."""
    from mera_ds.config import absolute, load_config

    cfg = load_config(args.config, args.set)
    update = {"run_dir": absolute(args.run)} if args.run else {}
    if args.ray_address:
        update["cluster"] = cfg.cluster.model_copy(update={"ray_address": args.ray_address})
    return cfg.model_copy(update=update)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mera", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging; a run shows every process's logs on the console "
                             "(otherwise in RUN/logs/, the console showing its steps)")
    parser.add_argument("--debug", action="store_true",
                        help="let errors through with their traceback (also: MERA_DEBUG=1)")
    # The deepspeed launcher passes each rank --local_rank=N before the sub-command (and also
    # sets LOCAL_RANK, which is what is used).
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    # Each sub-command module imports what it runs only when it runs (`mera --help` stays fast).
    from mera_ds.cli import bench, config, export, merge, predict, report, run, shards, stage

    for command in (config, shards, run, stage, merge, report, export, predict, bench):
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mera_ds.run import console

    args = build_parser().parse_args(argv)
    # Every record on the console as it comes; a run keeps them to its log file instead once it
    # starts (unless -v), showing its steps (mera_ds.run.console).
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format=console.FORMAT)
    console.setup(args.verbose)
    debug = args.debug or os.environ.get("MERA_DEBUG", "") not in ("", "0")
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if debug:
            raise
        # Bad input is the user's to fix: one line, no traceback. Anything else is ours, still
        # one line, with the way to the traceback.
        if isinstance(e, MeraError):
            print(f"mera: error: {e}", file=sys.stderr)
            return 2
        print(f"mera: error: {describe(e)} (--debug shows the traceback)", file=sys.stderr)
        return 1


def describe(e: BaseException) -> str:
    """One line for an error that is not a MeraError: the file an OSError names, and the last
    line of the message (where chained tracebacks printed as text end)."""
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[-1]}" if lines else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
