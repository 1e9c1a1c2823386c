"""`mera shards synth|inspect|convert`: write the built-in dataset; summarise a set of shards;
convert your own data (LLaVA-style JSON and media files) into shards."""
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
    synth.add_argument("--tasks", default="classify", choices=["classify", "compositional"],
                       help="the task set: classify (one-word answers, the embedded default's) "
                            "or compositional (multi-attribute answers, the MCL benchmark's)")
    synth.set_defaults(func=_synth)

    base = sub.add_parser(
        "base", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="pretrain the MCL benchmark's base LLM (tiny Llama, BPE tokenizer) on generated "
             "text covering the compositional tasks' words")
    base.add_argument("--out", required=True, help="HF directory to write (local or s3://)")
    base.add_argument("--seed", type=int, default=0)
    base.add_argument("--steps", type=int, default=200)
    base.set_defaults(func=_base)

    inspect = sub.add_parser("inspect", help="count the shards, samples, fields and modalities "
                                             "of a shard pattern")
    inspect.add_argument("pattern", help="brace pattern or glob of local paths or s3:// URLs")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(func=_inspect)

    convert = sub.add_parser(
        "convert", help="convert a LLaVA-style JSON and its media files into shards",
        description="Convert the records of a LLaVA-style JSON into shards (docs/DATA.md §8). "
                    "Bad records are skipped and reported; a re-run resumes.")
    convert.add_argument("--format", choices=["llava"], default="llava",
                         help="input format (default: %(default)s)")
    convert.add_argument("--input", required=True, help="the JSON list of records (local or s3://)")
    convert.add_argument("--media-root", required=True,
                         help="directory the records' media paths are relative to (or s3://)")
    convert.add_argument("--modality", required=True, choices=["image", "video", "audio"],
                         help="the record field naming the media file, and its input kind")
    convert.add_argument("--out", required=True,
                         help="shard file template with %%06d, e.g. OUT/train-%%06d.tar "
                              "(local or s3://)")
    convert.add_argument("--name", help="the samples' json modality: a modality name of the run "
                                        "config (default: --modality)")
    convert.add_argument("--samples-per-shard", type=int, default=1000,
                         help="records per shard (default: %(default)s)")
    convert.add_argument("--workers", type=int, default=1,
                         help="processes writing shards (default: %(default)s)")
    convert.add_argument("--strict", action="store_true",
                         help="stop at the first bad record instead of skipping it")
    convert.add_argument("--sample-rate", type=int, default=16000,
                         help="audio: resample to this rate in Hz (default: %(default)s)")
    convert.add_argument("--num-frames", type=int, default=8,
                         help="video: frames taken evenly over each clip (default: %(default)s)")
    convert.add_argument("--frame-size", type=int,
                         help="video: resize frames so the short side is this (default: as "
                              "they are)")
    convert.set_defaults(func=_convert)


def _synth(args: argparse.Namespace) -> int:
    from mera_ds.data.synth import synth_dataset

    patterns = synth_dataset(args.out, seed=args.seed,
                             train_per_modality=args.train_per_modality,
                             eval_per_modality=args.eval_per_modality,
                             samples_per_shard=args.samples_per_shard, tasks=args.tasks)
    for modality, splits in patterns.items():
        for split, pattern in splits.items():
            print(f"{modality:<6} {split:<5} {pattern}")
    return 0


def _base(args: argparse.Namespace) -> int:
    from mera_ds.model.base import pretrain_base

    about = pretrain_base(args.out, seed=args.seed, steps=args.steps)
    print(f"{args.out}: vocabulary {about['vocab_size']}, held-out perplexity "
          f"{about['heldout_perplexity']:.2f} (untrained {about['heldout_perplexity_untrained']:.0f})"
          f", {about['seconds']:.0f} s")
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


LISTED_SKIPS = 10  # skipped records the summary names; the report has all of them


def _convert(args: argparse.Namespace) -> int:
    from mera_ds.data.convert import convert_llava

    r = convert_llava(args.input, args.media_root, args.modality, args.out, name=args.name,
                      samples_per_shard=args.samples_per_shard, workers=args.workers,
                      strict=args.strict, sample_rate=args.sample_rate,
                      num_frames=args.num_frames, frame_size=args.frame_size)
    print(f"samples:  {r['samples']} of {r['records']} records, in {r['shards']} shards "
          f"({r['kept_shards']} already written)")
    print(f"skipped:  {r['skipped']} records (all of them in {r['report']})")
    for s in r["skipped_records"][:LISTED_SKIPS]:
        print(f"  record {s['index']} (id {s['id']!r}): {s['reason']}")
    if r["skipped"] > LISTED_SKIPS:
        print(f"  ... and {r['skipped'] - LISTED_SKIPS} more")
    for url in r["empty_shards"]:
        print(f"empty:    {url} (none of its records decodes)")
    print(f"pattern:  {r['pattern']}")
    return 0
