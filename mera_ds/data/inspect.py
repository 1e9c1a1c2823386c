"""What a set of shards holds: shard and sample counts, member extensions, modalities, answers."""
from __future__ import annotations

import json
from collections import Counter
from typing import Any

from mera_ds.data.tar import CorruptDataError, existing_shards, raw_samples


def inspect_shards(pattern: str) -> dict[str, Any]:
    """Read every sample of `pattern` (inputs are not decoded) and summarise it:
    {"pattern", "shards", "samples", "fields", "modalities": {m: n}, "answers": {m: {a: n}}}."""
    urls = existing_shards(pattern)
    fields: set[str] = set()
    modalities: Counter[str] = Counter()
    answers: dict[str, Counter[str]] = {}
    samples = 0
    for url in urls:
        for raw in raw_samples(url):
            samples += 1
            fields.update(k for k in raw if not k.startswith("__"))
            try:
                meta = json.loads(raw["json"])
                modality = meta["modality"]
                answer = meta["messages"][-1]["content"] if "messages" in meta else meta["answer"]
            except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
                raise CorruptDataError(f"{url}: sample {raw['__key__']!r}: no json with modality "
                                       f"and answer ({type(e).__name__}: {e})") from None
            modalities[modality] += 1
            answers.setdefault(modality, Counter())[answer] += 1
    return {"pattern": pattern, "shards": len(urls), "samples": samples,
            "fields": sorted(fields), "modalities": dict(sorted(modalities.items())),
            "answers": {m: dict(sorted(a.items())) for m, a in sorted(answers.items())}}
