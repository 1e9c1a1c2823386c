"""Data: WebDataset shards on local paths or s3:// URLs (the sample schema: docs/DATA.md).

tar.py reads shards (which a pattern names, which a rank reads, their raw samples), decode.py
decodes samples, loader.py streams them to training and evaluation (split by rank and worker,
mixed, batched), writer.py writes shards, replay.py samples a replay set, synth.py makes the
built-in dataset, inspect.py summarises a set of shards.
"""
