"""`mera stage {align,finetune} --config C --modality M --run RUN`: one training stage, on Ray."""
from mera_ds.config import absolute, load_config


def register(sub):
    p = sub.add_parser("stage", help="run one training stage of a run through Ray")
    p.add_argument("stage", choices=["align", "finetune"])
    p.add_argument("--config", required=True)
    p.add_argument("--modality", required=True)
    p.add_argument("--run", help="run directory (default: the config's run_dir)")
    p.add_argument("--ray-address", help="Ray cluster (default: RAY_ADDRESS or a local instance)")
    p.add_argument("--checkpoint-every", type=int, help="steps between resume checkpoints")
    p.set_defaults(func=_run)


def _run(args):
    import json

    from mera_ds.dist.train_job import run_stage

    cfg = load_config(args.config)
    update = {"run_dir": absolute(args.run)} if args.run else {}
    if args.ray_address:
        update["cluster"] = cfg.cluster.model_copy(update={"ray_address": args.ray_address})
    cfg = cfg.model_copy(update=update)
    metrics = run_stage(cfg, args.stage, args.modality, source=args.config,
                        checkpoint_every=args.checkpoint_every)
    print(json.dumps(metrics, indent=2, sort_keys=True))
