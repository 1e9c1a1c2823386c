"""`mera report RUN`: print P, the per-stage averages and BRG, and write RUN/report/."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("report", help="report a run: performance matrix, BRG, loss curves",
                       description="Read a run directory (local or s3://), print its performance "
                                   "matrix, per-stage averages and BRG, and write RUN/report/ "
                                   "(report.md, report.json, heatmap and loss curve PNGs).")
    p.add_argument("run", metavar="RUN", help="run directory (local path or s3:// prefix)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from mera_ds.run.report import build_report, format_text, write_report

    report = build_report(args.run)
    path = write_report(args.run, report)
    print(format_text(report))
    print(f"\nreport: {path}")
    return 0
