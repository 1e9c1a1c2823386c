"""Replay sampling: r% of a modality's training samples, kept for realigning its connector later.

In stage i, exactly round(r * N_i) of modality i's N_i training samples are drawn uniformly
without replacement and copied, byte for byte, into replay shards (RunLayout.replay_dir). Two
passes over the training shards (list the keys, then copy the chosen samples), so only the keys
are ever held in memory, never the samples.
"""
from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Iterator

from mera_ds import storage
from mera_ds.data.tar import expand_shards, raw_samples
from mera_ds.data.writer import write_shards
from mera_ds.errors import MeraError

log = logging.getLogger("mera_ds.data")

# Two data-parallel ranks each need a replay shard of their own (tar.rank_shards).
DEFAULT_NUM_SHARDS = 2
REPLAY_PREFIX = "replay"
MANIFEST = "replay.json"


@dataclass(frozen=True)
class ReplaySet:
    """Training data named by a replay directory, read when a job starts (an earlier step writes
    it): its shards, weighed by their sample count, or (`source`) the training set it was drawn
    from, weighed by that set's size."""

    dir: str
    source: bool = False

    def resolve(self) -> tuple[str, float]:
        """(shard pattern, mixing weight)."""
        info = storage.read_json(storage.join(self.dir, MANIFEST))
        if self.source:
            return info["source"], float(info["source_samples"])
        return info["pattern"], float(info["samples"])


def _digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def _list_keys(pattern: str, urls: list[str]) -> list[tuple[str, list[str]]]:
    """(shard URL, its sample keys in order) for every shard: the first pass."""
    shards, seen = [], set()
    for url in urls:
        keys = []
        for raw in raw_samples(url):
            key = raw["__key__"]
            if key in seen:  # a key must name one sample, or "which samples" is ambiguous
                raise MeraError(f"{pattern}: sample key {key!r} occurs twice ({url})")
            seen.add(key)
            keys.append(key)
        shards.append((url, keys))
    return shards


def _chosen_samples(shards: list[tuple[str, list[str]]], chosen: set[str]
                    ) -> Iterator[dict[str, Any]]:
    """The raw samples whose keys were chosen, in shard order: the second pass. Shards with no
    chosen sample are not read, a shard is read only up to its last chosen sample."""
    for url, keys in shards:
        wanted = chosen.intersection(keys)
        if not wanted:
            continue
        for raw in raw_samples(url):
            if raw["__key__"] in wanted:
                wanted.discard(raw["__key__"])
                yield {k: v for k, v in raw.items() if k != "__url__"}
                if not wanted:
                    break
        if wanted:
            raise MeraError(f"{url}: changed while sampling replay; {len(wanted)} sample(s) "
                            f"listed in the first pass are gone, e.g. {min(wanted)!r}")


def sample_replay(train_pattern: str, out_dir: str, ratio: float, seed: int, *,
                  num_shards: int | None = None) -> dict[str, Any]:
    """Copy exactly round(ratio * N) of the N samples of `train_pattern` into replay shards
    OUT_DIR/replay-NNNNNN.tar, plus OUT_DIR/replay.json describing them; return that description:
    {"pattern", "samples", "source_samples", "ratio", "seed", "source", "keys_sha256"}.

    The choice is uniform without replacement and depends only on `seed` and the source's keys
    (in order), so a copy of the same shards elsewhere (local or s3://) gives the same replay.
    Samples are copied undecoded. There are `num_shards` shards (default 2: one per training rank)
    of ceil(k / num_shards) samples each, the last holding the rest; when that would leave fewer
    than num_shards shards (only if k <= num_shards * (num_shards - 1)), shards hold
    k // num_shards samples and there are more of them. A replay of fewer samples than
    num_shards is an error: the replay mix could not give every rank a shard.

    OUT_DIR is committed at once (storage.committed_dir): locally it appears only when complete;
    on S3 replay.json is written last and marks it complete. An existing OUT_DIR is an error and is
    left as it is.
    """
    num_shards = DEFAULT_NUM_SHARDS if num_shards is None else num_shards
    if not 0 < ratio <= 1:
        raise MeraError(f"replay ratio must be in (0, 1], got {ratio}")
    if num_shards < 1:
        raise MeraError(f"replay num_shards must be >= 1, got {num_shards}")
    out_dir = out_dir.rstrip("/")
    start = time.perf_counter()
    with storage.committed_dir(out_dir) as tmp:
        shards = _list_keys(train_pattern, expand_shards(train_pattern))
        keys = [k for _, shard_keys in shards for k in shard_keys]
        n, k = len(keys), round(ratio * len(keys))
        log.info("replay of %s: %d samples in %d shard(s) listed, %.1f s", train_pattern, n,
                 len(shards), time.perf_counter() - start)
        if k < num_shards:
            raise MeraError(f"{train_pattern}: a replay ratio of {ratio} of {n} samples is {k} "
                            f"sample(s), fewer than the {num_shards} replay shards the training "
                            "ranks need (raise the ratio or give more samples)")
        # A string seed is hashed with sha512 by `random`: the same in every process and run.
        rng = random.Random(f"replay/{seed}/{_digest(keys)}")
        chosen = set(rng.sample(keys, k))
        per_shard = math.ceil(k / num_shards)
        if math.ceil(k / per_shard) < num_shards:
            per_shard = k // num_shards
        written = write_shards(_chosen_samples(shards, chosen),
                               storage.join(tmp, REPLAY_PREFIX), per_shard)
        # The pattern names the shards where they end up, not in the temporary directory.
        result = {"pattern": storage.join(out_dir, written.rsplit("/", 1)[-1]),
                  "samples": k, "source_samples": n, "ratio": ratio, "seed": seed,
                  "source": train_pattern, "keys_sha256": _digest(sorted(chosen))}
        storage.write_json(storage.join(tmp, MANIFEST), result)
    log.info("replay of %s: %d of %d samples in %s, %.1f s", train_pattern, k, n,
             result["pattern"], time.perf_counter() - start)
    return result
