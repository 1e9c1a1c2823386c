"""`mera export RUN --out DIR`: the run's final MLLM as one self-contained directory
(mera_ds.bundle), which `mera predict` loads."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("export", help="write a finished run's final MLLM to a directory",
                       description="Copy the final LLM and connectors of a finished run (those "
                                   "of its last evaluation) into DIR (local or s3://), with "
                                   "DIR/mera_model.json tying them to their encoders, tasks and "
                                   "the run they came from; `mera predict DIR` loads it.")
    p.add_argument("run", metavar="RUN", help="run directory (local path or s3:// prefix)")
    p.add_argument("--out", required=True, metavar="DIR", help="the directory to write")
    p.add_argument("--force", action="store_true", help="replace an existing DIR")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from mera_ds.bundle import directory_url, export
    from mera_ds.errors import MeraError
    from mera_ds.storage import exists

    out = directory_url(args.out, "output directory")
    if exists(out) and not args.force:
        raise MeraError(f"{out}: already exists; --force replaces it")
    bundle = export(args.run, out, force=args.force)
    scores = ", ".join(f"{m} {s:.3f}" for m, s in bundle.source.scores.items())
    print(f"{out}: the final model of {bundle.source.run_dir} ({bundle.source.eval_step}: "
          f"{scores})")
    return 0
