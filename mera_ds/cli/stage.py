"""`mera stage PHASE --config C --modality M`: one step of a run's plan (the PHASE of modality M's
stage), recorded in the run's manifest like `mera run` records it. On Ray by default; with
--executor local in this process, or in every rank of a launcher:

    deepspeed --num_gpus 8 --module mera_ds stage finetune --config C --modality M --executor local
    torchrun --nproc_per_node 2 -m mera_ds stage finetune --config C --modality M --executor local
"""
import argparse

from mera_ds.cli import add_run_arguments, execute_steps, run_config


def register(sub):
    from mera_ds.run.plan import PHASES

    p = sub.add_parser("stage", help="run one step (phase of a stage) of a run",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=PHASES)
    p.add_argument("--config", required=True)
    p.add_argument("--modality", required=True, help="the stage's modality")
    add_run_arguments(p)
    p.set_defaults(func=_run)


def _run(args):
    import json
    import os

    from mera_ds.run.layout import RunLayout
    from mera_ds.run.plan import Method, find_step, plan

    cfg = run_config(args)
    cfg.modality(args.modality)  # names the modality at fault before anything starts
    step = find_step(plan(cfg, Method.of(cfg), RunLayout.of(cfg)), args.phase, args.modality)
    result = execute_steps(args, cfg, [step], resume=True).steps[step.name]["result"]
    if args.executor == "local":
        from mera_ds.train.runtime import shutdown_distributed

        shutdown_distributed()
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(result, indent=2, sort_keys=True))
