"""`mera config check CONFIG`: validate a run config without running anything."""
from mera_ds.cli import add_set_argument
from mera_ds.config import load_config


def register(sub):
    p = sub.add_parser("config", help="run configs")
    csub = p.add_subparsers(dest="config_command", required=True)
    check = csub.add_parser("check", help="validate a run config; print its summary")
    check.add_argument("config")
    add_set_argument(check)
    check.set_defaults(func=_check)


def _check(args):
    cfg = load_config(args.config, args.set)
    print(f"{args.config}: ok (digest {cfg.digest()})")
    print(f"  run_dir: {cfg.run_dir}")
    print(f"  llm: {cfg.llm.path or 'built-in tiny Llama'} ({cfg.llm.dtype})")
    for i, m in enumerate(cfg.modalities, 1):
        print(f"  stage {i:02d}: {m.name:<8} encoder={m.encoder.type} connector={m.connector.type}"
              f" train={m.train_shards}")
