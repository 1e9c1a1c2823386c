"""`mera run CONFIG`: the pipeline driver (local Ray instance unless a cluster is given)."""
from mera_ds.config import absolute, load_config


def register(sub):
    p = sub.add_parser("run", help="run the MERA pipeline of a config")
    p.add_argument("config")
    p.add_argument("--run", help="run directory (default: the config's run_dir)")
    p.add_argument("--ray-address", help="Ray cluster (default: RAY_ADDRESS or a local instance)")
    p.set_defaults(func=_run)


def _run(args):
    from mera_ds.dist.pipeline import run_pipeline

    cfg = load_config(args.config)
    update = {"run_dir": absolute(args.run)} if args.run else {}
    if args.ray_address:
        update["cluster"] = cfg.cluster.model_copy(update={"ray_address": args.ray_address})
    cfg = cfg.model_copy(update=update)
    timings = run_pipeline(cfg, source=args.config)
    print(f"\n{'stage':<24} seconds")
    for name, seconds in timings.items():
        print(f"{name:<24} {seconds:7.1f}")
    print(f"{'total':<24} {sum(timings.values()):7.1f}")
