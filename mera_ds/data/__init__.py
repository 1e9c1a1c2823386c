"""Data: WebDataset shards on local paths or s3:// URLs.

writer.py writes shards, shards.py reads them (split by rank and worker, decoded, mixed),
synth.py makes the built-in dataset, inspect.py summarises a set of shards.
"""
