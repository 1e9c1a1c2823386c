"""`mera run CONFIG [--resume]`: the pipeline driver (a local Ray instance unless a cluster is
given); ends by writing and printing the run's report."""
from mera_ds.cli import add_run_arguments, run_config


def register(sub):
    p = sub.add_parser("run", help="run the MERA pipeline of a config")
    p.add_argument("config")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in run_dir: finished stages are skipped")
    add_run_arguments(p)
    p.set_defaults(func=_run)


def _run(args):
    from mera_ds.dist.pipeline import run_pipeline
    from mera_ds.report import build_report, format_text, write_report

    cfg = run_config(args)
    timings = run_pipeline(cfg, source=args.config, resume=args.resume)
    report = build_report(cfg.run_dir)
    path = write_report(cfg.run_dir, report)
    print("\n" + format_text(report))
    print(f"\n{'stage run now':<24} seconds")
    for name, seconds in timings.items():
        print(f"{name:<24} {seconds:7.1f}")
    print(f"{'total':<24} {sum(timings.values()):7.1f}")
    print(f"\nreport: {path}")
