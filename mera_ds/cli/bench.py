"""`mera bench mcl`: the MCL benchmark (mera_ds.run.mcl) on one order and seed, and
`mera bench mcl-summary`: mean and spread over several of its JSON results."""
import os

from mera_ds.cli import add_set_argument


def register(sub):
    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench", required=True)
    mcl = bench.add_parser("mcl", help="MERA against the MCL baselines, one order and seed, "
                                       "in one process")
    mcl.add_argument("--config", default="launch/configs/mcl.yaml",
                     help="run config: model, data and hyperparameters for every method "
                          "(default: the benchmark's, on the data and base LLM that `make "
                          "mcl-shards` writes)")
    mcl.add_argument("--order", help="training order, e.g. image,video,audio,depth "
                                     "(default: the config's)")
    mcl.add_argument("--seed", type=int, help="default: the config's")
    mcl.add_argument("--methods", help="comma-separated (default: the paper's baselines and "
                     "mera-1, mera-10; also mera-avg, mera-ties, mera-dare, mera-pcb: "
                     "merges across stages)")
    mcl.add_argument("--out", help="working directory (default: runs/mcl/ORDER-sSEED)")
    mcl.add_argument("--json", help="write the results here (default: OUT/mcl.json)")
    mcl.add_argument("--matrix", action="store_true", help="print every method's P matrix")
    add_set_argument(mcl)
    mcl.add_argument("--resume", action="store_true",
                     help="continue the benchmark in OUT: finished steps are skipped")
    mcl.set_defaults(func=_mcl)
    summary = bench.add_parser("mcl-summary", help="mean and spread of BRG over MCL results")
    summary.add_argument("results", nargs="+", help="JSON files written by `mera bench mcl`")
    summary.set_defaults(func=_summary)


def _mcl(args):
    from mera_ds.config import load_config
    from mera_ds.run.layout import RunLayout
    from mera_ds.run.mcl import bench_config, format_table, plot, run_mcl
    from mera_ds.storage import write_json

    cfg = load_config(args.config, args.set)
    order = args.order.split(",") if args.order else None
    seed = cfg.seed if args.seed is None else args.seed
    out = args.out or os.path.join(
        "runs", "mcl", f"{'-'.join(order or [m.name for m in cfg.modalities])}-s{seed}")
    cfg = bench_config(cfg, order, seed, out)
    result = run_mcl(cfg, args.methods.split(",") if args.methods else None, resume=args.resume)
    layout = RunLayout.of(cfg)
    path, image = args.json or layout.mcl_results, layout.mcl_plot
    write_json(path, result)
    plot(result, image)
    print("\n" + format_table(result, matrix=args.matrix))
    print(f"\nresults: {path}\nplot: {image}")


def _summary(args):
    from mera_ds.errors import MeraError
    from mera_ds.run.mcl import summarize
    from mera_ds.storage import read_json

    results = []
    for path in args.results:
        result = read_json(path)
        if not isinstance(result, dict) or not {"order", "seed", "methods"} <= set(result):
            raise MeraError(f"{path}: not a result of `mera bench mcl` (no order, seed and "
                            f"methods)")
        results.append(result)
    print(summarize(results))
