"""`mera stage {align,finetune,realign} --config C --modality M --run RUN`: one training stage, on Ray."""
from mera_ds.cli import add_run_arguments, run_config


def register(sub):
    p = sub.add_parser("stage", help="run one training stage of a run through Ray")
    p.add_argument("stage", choices=["align", "finetune", "realign"])
    p.add_argument("--config", required=True)
    p.add_argument("--modality", required=True)
    add_run_arguments(p)
    p.add_argument("--checkpoint-every", type=int, help="steps between resume checkpoints")
    p.set_defaults(func=_run)


def _run(args):
    import json

    from mera_ds.dist.train_job import run_stage

    metrics = run_stage(run_config(args), args.stage, args.modality, source=args.config,
                        checkpoint_every=args.checkpoint_every)
    print(json.dumps(metrics, indent=2, sort_keys=True))
