"""`mera merge`: merge LLM directories (HF layout, local or s3://) with one of the strategies."""
from __future__ import annotations


import argparse


def register(sub) -> None:
    from mera_ds.merge.strategies import STRATEGIES

    p = sub.add_parser(
        "merge", help=f"merge LLM checkpoints ({', '.join(STRATEGIES)})",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Stream-merge HF-layout safetensors LLM directories, tensor by tensor, into "
                    "a new directory that appears only when complete.\n\nstrategies:\n" +
                    "\n".join(f"  {n:<16} {s.summary}" for n, s in STRATEGIES.items()))
    p.add_argument("--strategy", default="mera", choices=list(STRATEGIES))
    p.add_argument("--prev", required=True, metavar="DIR",
                   help="theta_{i-1}: the previous stage's LLM (the base of the deltas)")
    p.add_argument("--finetuned", required=True, action="extend", nargs="+", metavar="DIR",
                   help="fine-tuned LLM(s); repeat or list several")
    p.add_argument("--step", type=int, metavar="I", help="mera: the stage i being merged (>= 2)")
    p.add_argument("--out", required=True, metavar="DIR", help="output LLM directory")
    p.add_argument("--weights", type=float, nargs="+", metavar="W",
                   help="linear: one weight per model, --prev first then each --finetuned "
                        "(normalised; default equal)")
    p.add_argument("--lam", type=float, help="task_arithmetic/ties/dare/pcb: scale of the "
                                             "deltas (default 1)")
    p.add_argument("--density", type=float, help="ties/pcb: fraction of each delta kept "
                                                 "(default 0.2)")
    p.add_argument("--drop-p", type=float, help="dare: drop probability (default 0.9)")
    p.add_argument("--seed", type=int, help="dare: seed of the drop masks (default 0)")
    p.add_argument("--coefficients", metavar="FILE",
                   help="ada: JSON {tensor: [one coefficient per --finetuned]}, as a mera-ada "
                        "realign writes it")
    p.add_argument("--shard-size", default="2GB", help="output shard size (default 2GB)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes merging output shards in parallel (default 1)")
    p.add_argument("--threads", type=int, help="threads merging within each process (default: "
                                               "the cores it may use, shared by the workers)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from pydantic import ValidationError

    from mera_ds.config import MergeConfig
    from mera_ds.errors import MeraError
    from mera_ds.merge.engine import merge_llm

    fields = {"strategy": args.strategy, "weights": args.weights, "lam": args.lam,
              "density": args.density, "drop_p": args.drop_p, "seed": args.seed,
              "coefficients": args.coefficients, "shard_size": args.shard_size,
              "threads": args.threads}
    try:
        cfg = MergeConfig(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        flag = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "merge"
        raise MeraError(f"{flag}: {err['msg'].removeprefix('Value error, ')}") from None
    if args.workers < 1:
        raise MeraError(f"--workers: must be at least 1, got {args.workers}")
    report = merge_llm(args.prev, args.finetuned, args.out, cfg, step=args.step,
                       workers=args.workers, overwrite=args.overwrite)
    print(f"merged {report.tensors} tensors ({report.bytes_written / 1e9:.2f} GB, "
          f"{report.shards} shards) in {report.seconds:.1f} s "
          f"({report.read_mb_s:.0f} MB/s of input) -> {report.out}")
    return 0
