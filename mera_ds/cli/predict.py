"""`mera predict DIR`: ask an exported model (`mera export`) about an input, or about every line
of a JSONL file."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "predict", help="answer questions about inputs with an exported model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Load the model that `mera export` wrote to DIR and answer, greedily as "
                    "evaluation does:\n\n"
                    "  mera predict DIR --modality audio --input clip.wav --prompt 'which note?'\n"
                    "  mera predict DIR --batch questions.jsonl --out answers.jsonl\n\n"
                    "An input is an image, audio or video file, a .npy array (depth: (H, W); "
                    "features: (N, D)), or a shard's sample, SHARD.tar#KEY. A JSONL line is "
                    '{"modality", "input", "prompt"[, "id"]}; each answer line is it plus '
                    '"answer", in the same order.')
    p.add_argument("model", metavar="DIR", help="exported model directory (local or s3://)")
    p.add_argument("--modality", help="the input's modality (one of the model's)")
    p.add_argument("--input", help="file, or SHARD.tar#KEY")
    p.add_argument("--prompt", help="the question")
    p.add_argument("--batch", metavar="JSONL", help="a file of questions, one JSON object a line")
    p.add_argument("--out", metavar="JSONL", help="--batch: where the answers go (default: "
                                                  "standard output)")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="tokens generated at most (default: the modality's task.max_new_tokens)")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="default: cuda if there is a GPU, else cpu")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="questions answered together (default 8)")
    p.set_defaults(func=_run, parser=p)


def _run(args) -> int:
    single = (args.modality, args.input, args.prompt)
    if args.batch is None and None in single:
        args.parser.error("give --modality, --input and --prompt, or --batch")
    if args.batch is not None and (any(x is not None for x in single)):
        args.parser.error("--batch takes its modalities, inputs and prompts from the file")
    if args.out is not None and args.batch is None:
        args.parser.error("--out goes with --batch")
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            args.parser.error(f"--{name.replace('_', '-')} must be at least 1")

    import torch

    from mera_ds import bundle, predict
    from mera_ds.errors import MeraError
    from mera_ds.storage import write_bytes

    questions = predict.read_questions(args.batch) if args.batch else \
        [predict.Question(args.modality, args.input, args.prompt)]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise MeraError("--device cuda: no CUDA device here (--device cpu)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    mllm, exported = bundle.load(args.model, device)
    answers = predict.answer(mllm, exported, questions, args.max_new_tokens, args.batch_size)
    if not args.batch:
        print(answers[0])
    elif args.out:
        write_bytes(args.out, predict.answers_jsonl(questions, answers).encode())
    else:
        print(predict.answers_jsonl(questions, answers), end="")
    return 0
