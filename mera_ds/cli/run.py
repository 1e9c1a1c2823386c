"""`mera run CONFIG [--resume]`: every step of the run's plan, on Ray (a local instance unless a
cluster is given) or in this process; ends by writing and printing the run's report."""
from mera_ds.cli import add_run_arguments, execute_steps, run_config


def register(sub):
    p = sub.add_parser("run", help="run the MERA pipeline of a config")
    p.add_argument("config")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in run_dir: finished steps are skipped")
    add_run_arguments(p)
    p.set_defaults(func=_run)


def _run(args):
    import os

    from mera_ds.errors import MeraError
    from mera_ds.run.layout import RunLayout
    from mera_ds.run.plan import Method, plan
    from mera_ds.run.report import build_report, format_text, write_report

    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise MeraError("mera run under a launcher: run the whole plan in one process, or one "
                        "training step on every rank with `mera stage PHASE --executor local`")
    cfg = run_config(args)
    timings = execute_steps(args, cfg, plan(cfg, Method.of(cfg), RunLayout.of(cfg)),
                            args.resume).timings
    report = build_report(cfg.run_dir)
    path = write_report(cfg.run_dir, report)
    print("\n" + format_text(report))
    print(f"\n{'step run now':<24} seconds")
    for name, seconds in timings.items():
        print(f"{name:<24} {seconds:7.1f}")
    print(f"{'total':<24} {sum(timings.values()):7.1f}")
    print(f"\nreport: {path}")
