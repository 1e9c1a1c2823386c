"""`mera shards synth|inspect`: write the built-in dataset; summarise a set of shards."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser("shards", help="write and inspect WebDataset shards")
    sub = parser.add_subparsers(dest="shards_command", required=True)

    synth = sub.add_parser("synth", help="write the built-in dataset (image, video, audio, depth)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    synth.add_argument("--out", required=True, help="local directory or s3:// prefix")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--train-per-modality", type=int, default=2000)
    synth.add_argument("--eval-per-modality", type=int, default=200)
    synth.add_argument("--samples-per-shard", type=int, default=500)
    synth.set_defaults(func=_synth)

    inspect = sub.add_parser("inspect", help="count the shards, samples, fields and modalities "
                                             "of a shard pattern")
    inspect.add_argument("pattern", help="brace pattern or glob of local paths or s3:// URLs")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(func=_inspect)


def _synth(args: argparse.Namespace) -> int:
    from mera_ds.data.synth import synth_dataset

    patterns = synth_dataset(args.out, seed=args.seed,
                             train_per_modality=args.train_per_modality,
                             eval_per_modality=args.eval_per_modality,
                             samples_per_shard=args.samples_per_shard)
    for modality, splits in patterns.items():
        for split, pattern in splits.items():
            print(f"{modality:<6} {split:<5} {pattern}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from mera_ds.data.inspect import inspect_shards

    summary = inspect_shards(args.pattern)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"pattern:  {summary['pattern']}")
    print(f"shards:   {summary['shards']}")
    print(f"samples:  {summary['samples']}")
    print(f"fields:   {' '.join(summary['fields'])}")
    for modality, count in summary["modalities"].items():
        answers = ", ".join(f"{a} {n}" for a, n in summary["answers"][modality].items())
        print(f"modality: {modality} ({count} samples; answers: {answers})")
    return 0
