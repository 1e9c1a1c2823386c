"""`mera shards convert`: bring-your-own data, from a LLaVA-style JSON (records of one media file
and a conversation about it) to this project's WebDataset shards (docs/DATA.md §8).

Which records go to which shard is decided before anything is decoded: shard k holds the records
[k*N, (k+1)*N) of those that pass the cheap checks (the record's structure; its media file
exists). So shards can be written in any order, by any number of processes, always with the same
bytes, and a re-run writes only the shards that are missing. A record whose media then does not
decode is left out of its shard.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator

import numpy as np

from mera_ds import storage
from mera_ds.data import media
from mera_ds.data.writer import encode_input, shard_file, tar_writer
from mera_ds.errors import MeraError

MODALITIES = ("image", "video", "audio")
SPEAKERS = ("human", "gpt")  # LLaVA's turns, in order -> the roles of a sample's messages
ROLES = ("user", "assistant")
# The model's placeholder token (mera_ds.model.tiny.PLACEHOLDER, not imported: that loads torch).
# A message holding it is refused in training, so a record holding it is a bad record here.
PLACEHOLDER = "<modality>"


class BadRecord(MeraError):
    """A record that is not a LLaVA record this converter takes: skipped (or, --strict, fatal)."""


@dataclasses.dataclass(frozen=True)
class Options:
    """What decides a shard's bytes, besides its records."""
    modality: str  # the input kind, and the record field naming the media file
    name: str  # the json `modality` of the samples: a modality name of the run config
    sample_rate: int | None  # audio only
    num_frames: int | None  # video only
    frame_size: int | None  # video only: the short side, or None to keep the clip's size


@dataclasses.dataclass(frozen=True)
class Record:
    index: int  # in the input list; makes the key
    id: Any  # the record's own id (None if it has none), kept in the json
    media: str  # URL of the media file
    messages: list[dict[str, str]]


@dataclasses.dataclass(frozen=True)
class Job:
    """One shard to write: what a worker process needs."""
    shard: int
    url: str
    result_url: str
    records: list[Record]
    options: Options
    strict: bool
    source: str  # the input URL, to name records in errors


@dataclasses.dataclass(frozen=True)
class Output:
    """Where a conversion's files go, from the --out template (OUT/train-%06d.tar): the shards,
    `train-convert.json` (its settings), `train-report.json` and, per shard written,
    `.train-convert/NNNNNN.json` (its sample count and skipped records)."""
    template: str
    dir: str
    stem: str

    @classmethod
    def parse(cls, template: str) -> "Output":
        head, _, name = template.rpartition("/")
        if template.count("%06d") != 1 or "%06d" not in name:
            raise MeraError(f"--out {template}: needs one %06d in the file name, where the shard "
                            f"number goes (e.g. OUT/train-%06d.tar)")
        if any(c in template for c in "{}*?["):
            raise MeraError(f"--out {template}: braces and glob characters are not allowed "
                            f"(the printed shard pattern uses them)")
        return cls(template, head or ".", name.replace("%06d", "").split(".")[0])

    def shard(self, k: int) -> str:
        return self.template.replace("%06d", f"{k:06d}")

    def pattern(self, num_shards: int) -> str:
        return self.template.replace("%06d", f"{{{0:06d}..{num_shards - 1:06d}}}")

    @property
    def settings_url(self) -> str:
        return storage.join(self.dir, f"{self.stem}convert.json")

    @property
    def report_url(self) -> str:
        return storage.join(self.dir, f"{self.stem}report.json")

    @property
    def results_dir(self) -> str:
        return storage.join(self.dir, f".{self.stem}convert")

    def result_url(self, k: int) -> str:
        return storage.join(self.results_dir, f"{k:06d}.json")


def convert_llava(source: str, media_root: str, modality: str, out: str, *,
                  name: str | None = None, samples_per_shard: int = 1000, workers: int = 1,
                  strict: bool = False, sample_rate: int = 16000, num_frames: int = 8,
                  frame_size: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Convert the LLaVA JSON `source` into the shards of `out` (OUT/train-%06d.tar), resuming an
    earlier run with the same settings. Returns the report (also written to OUT/train-report.json)
    plus `report` (its URL) and `kept_shards` (the shards found already written)."""
    options = _options(modality, name, sample_rate, num_frames, frame_size)
    for flag, value in (("samples_per_shard", samples_per_shard), ("workers", workers)):
        if value < 1:
            raise MeraError(f"{flag} must be >= 1, got {value}")
    output = Output.parse(out)
    records, sha256 = _read_source(source)
    settings = {"format": "llava", "input_sha256": sha256, "media_root": _absolute(media_root),
                "samples_per_shard": samples_per_shard, **dataclasses.asdict(options)}
    claimed = _check_settings(output, settings)
    from tqdm import tqdm

    with tqdm(total=len(records), unit="record", desc="convert", disable=not progress) as bar:
        accepted, skipped = _check_records(records, source, media_root, modality, strict)
        bar.update(len(skipped))
        if not accepted:
            storage.write_json(output.report_url, _report(source, sha256, records, skipped, {}))
            raise MeraError(f"{source}: none of its {len(records)} records can be converted "
                            f"(reasons in {output.report_url})")
        if not claimed:
            storage.write_json(output.settings_url, settings)
        jobs = [Job(k, output.shard(k), output.result_url(k), accepted[i:i + samples_per_shard],
                    options, strict, source)
                for k, i in enumerate(range(0, len(accepted), samples_per_shard))]
        results = _finished(output, len(jobs))
        bar.update(sum(len(jobs[k].records) for k in results))
        kept = len(results)
        results.update(_run([j for j in jobs if j.shard not in results], workers, bar))
    report = _report(source, sha256, records, skipped, results, output.pattern(len(jobs)))
    storage.write_json(output.report_url, report)
    return {**report, "report": output.report_url, "kept_shards": kept}


def _options(modality, name, sample_rate, num_frames, frame_size) -> Options:
    if modality not in MODALITIES:
        raise MeraError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    checks = {"audio": {"sample_rate": sample_rate}, "image": {},
              "video": {"num_frames": num_frames, "frame_size": frame_size}}[modality]
    for flag, value in checks.items():
        if value is not None and value < 1:
            raise MeraError(f"{flag} must be >= 1, got {value}")
    if name is not None and (not name or "/" in name):
        raise MeraError(f"name must be a modality name of the run config, got {name!r}")
    return Options(modality, name or modality, checks.get("sample_rate"),
                   checks.get("num_frames"), checks.get("frame_size"))


def _read_source(url: str) -> tuple[list, str]:
    """The input's records and the SHA-256 of its bytes (which a resumed run must match)."""
    try:
        with storage.open_url(url, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise MeraError(f"{url}: no such file") from None
    try:
        records = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise MeraError(f"{url}: not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise MeraError(f"{url}: not a JSON list of records (the LLaVA format)")
    return records, hashlib.sha256(data).hexdigest()


def _absolute(url: str) -> str:
    return url.rstrip("/") if storage.is_remote(url) else os.path.abspath(url)


# --- the cheap checks ----------------------------------------------------------------------------

def _check_records(records: list, source: str, media_root: str, modality: str,
                   strict: bool) -> tuple[list[Record], list[dict]]:
    """(records to convert, skipped records as report entries), in input order. With `strict` the
    first bad record raises."""
    exists = _media_exists(media_root)
    accepted, skipped = [], []
    for index, raw in enumerate(records):
        record_id = raw.get("id") if isinstance(raw, dict) else None
        try:
            record = _record(index, raw, media_root, modality)
            if not exists(record.media):
                raise media.MediaError(f"{record.media}: no such file")
            accepted.append(record)
        except (BadRecord, media.MediaError) as e:
            if strict:
                raise MeraError(f"{source}: record {index} (id {record_id!r}): {e}") from None
            skipped.append({"index": index, "id": record_id, "reason": str(e)})
    return accepted, skipped


def _media_exists(root: str) -> Callable[[str], bool]:
    """Whether a media URL exists: a stat locally; in S3 one listing of the root, not a request
    per record."""
    if not storage.is_remote(root):
        return os.path.isfile
    fs, path = storage.url_to_fs(root)
    with storage.accessing(root):
        found = set(fs.find(path))
    return lambda url: storage.url_to_fs(url)[1] in found


def _record(index: int, raw: Any, media_root: str, modality: str) -> Record:
    if not isinstance(raw, dict):
        raise BadRecord("not a JSON object")
    path = raw.get(modality)
    if not isinstance(path, str) or not path:
        raise BadRecord(f"no {modality!r} field naming its media file")
    join = storage.join if storage.is_remote(media_root) else os.path.join
    return Record(index, raw.get("id"), join(media_root, path),
                  _messages(raw.get("conversations"), f"<{modality}>"))


def _messages(turns: Any, tag: str) -> list[dict[str, str]]:
    """LLaVA's conversation -> the sample's messages. The model puts the media before the first
    user message, so its tag (and the newline next to it) goes from the first turn; a tag
    anywhere else cannot be honoured."""
    if not isinstance(turns, list) or len(turns) < 2 or len(turns) % 2:
        raise BadRecord("'conversations' is not a list of human and gpt turns (alternating, "
                        "from human to gpt, at least 2)")
    messages = []
    for i, turn in enumerate(turns):
        speaker = SPEAKERS[i % 2]
        if not (isinstance(turn, dict) and turn.get("from") == speaker
                and isinstance(turn.get("value"), str)):
            raise BadRecord(f"conversations[{i}] is not {{\"from\": \"{speaker}\", "
                            f"\"value\": string}}")
        text, tags = turn["value"], turn["value"].count(tag)
        if PLACEHOLDER in text:
            raise BadRecord(f"conversations[{i}] has {PLACEHOLDER}, the model's placeholder "
                            f"token")
        if tags and i:
            raise BadRecord(f"conversations[{i}] has {tag}: only the first turn may hold it")
        if tags > 1:
            raise BadRecord(f"conversations[0] has {tags} {tag} tags: one media file per record")
        messages.append({"role": ROLES[i % 2], "content": _untag(text, tag) if tags else text})
    return messages


def _untag(text: str, tag: str) -> str:
    for form in (tag + "\n", "\n" + tag, tag):
        if form in text:
            return text.replace(form, "", 1).strip()
    return text


# --- resuming ------------------------------------------------------------------------------------

def _check_settings(output: Output, settings: dict[str, Any]) -> bool:
    """Whether the output holds this conversion already (with these settings); raises if it
    holds another or shards of another origin: two conversions never mix in one set of shards."""
    url = output.settings_url
    if storage.exists(url):
        old = storage.read_json(url)
        diff = [f"{k} {old.get(k)!r}, now {settings.get(k)!r}"
                for k in sorted({*old, *settings}) if old.get(k) != settings.get(k)]
        if diff:
            raise MeraError(f"{output.template}: holds a conversion with other settings "
                            f"({'; '.join(diff)}); convert into another --out, or delete "
                            f"those shards and {url}")
        return True
    if any(_is_shard_name(output, n) for n in _listing(output.dir)):
        raise MeraError(f"{output.template}: shards are already there but not {url}: not "
                        f"written by `mera shards convert`; convert into another --out")
    return False


def _is_shard_name(output: Output, name: str) -> bool:
    before, _, after = output.template.rpartition("/")[2].partition("%06d")
    middle = name[len(before):len(name) - len(after)]
    return (name.startswith(before) and name.endswith(after) and len(middle) == 6
            and middle.isdigit())


def _listing(url: str) -> set[str]:
    """The names in a directory (none if it is not there): one listing, also in S3."""
    fs, path = storage.url_to_fs(url)
    with storage.accessing(url):
        try:
            return {p.rstrip("/").rpartition("/")[2] for p in fs.ls(path, detail=False)}
        except (FileNotFoundError, NotADirectoryError):
            return set()


def _finished(output: Output, num_shards: int) -> dict[int, dict]:
    """The results of the shards already written. A shard is finished once it is there: its
    result is written just before it appears."""
    shards, results = _listing(output.dir), _listing(output.results_dir)
    return {k: storage.read_json(output.result_url(k)) for k in range(num_shards)
            if output.shard(k).rpartition("/")[2] in shards and f"{k:06d}.json" in results}


# --- writing shards ------------------------------------------------------------------------------

def _run(jobs: list[Job], workers: int, bar) -> Iterator[tuple[int, dict]]:
    """(shard, result) of each job as it completes: here, or in `workers` processes."""
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            yield job.shard, _write_shard(job, lambda: bar.update(1))
        return
    # fork: a worker starts in milliseconds, where spawn would import torch again (seconds).
    ctx = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    counter = ctx.Value("q", 0)
    base = bar.n
    # Not multiprocessing.Pool: it waits forever for the shard of a worker that died.
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker,
                             initargs=(counter,)) as pool:
        pending = {pool.submit(_pooled_shard, job): job for job in jobs}
        try:
            while pending:
                done, _ = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                bar.update(base + counter.value - bar.n)
                for future in done:
                    job = pending.pop(future)
                    try:
                        yield job.shard, future.result()
                    except BrokenProcessPool:
                        raise RuntimeError(f"{job.url}: a worker process died writing it (killed, "
                                           f"out of memory, or a decoder crashed); run again to "
                                           f"resume") from None
        finally:
            pool.shutdown(cancel_futures=True)  # shards being written are finished, no others


_counter = None  # in a worker process: the shared count of records done


def _init_worker(counter) -> None:
    global _counter
    _counter = counter


def _pooled_shard(job: Job) -> dict:
    def tick():
        with _counter.get_lock():
            _counter.value += 1
    return _write_shard(job, tick)


def _write_shard(job: Job, tick: Callable[[], Any]) -> dict:
    """Write one shard (atomically) and, just before it appears, its result: the samples written
    and the records skipped because their media does not decode."""
    if not storage.is_remote(job.url):
        storage.remove_stale_temporaries(job.url)  # what a killed run left
    samples, skipped = 0, []
    with shard_file(job.url) as f:
        with tar_writer(f) as tar:
            for record in job.records:
                try:
                    tar.write(_sample(record, job.options))
                    samples += 1
                except (BadRecord, media.MediaError) as e:
                    if job.strict:
                        raise MeraError(f"{job.source}: record {record.index} "
                                        f"(id {record.id!r}): {e}") from None
                    skipped.append({"index": record.index, "id": record.id, "reason": str(e)})
                tick()
        result = {"shard": job.url, "samples": samples, "skipped": skipped}
        storage.write_json(job.result_url, result)
    return result


def _sample(record: Record, options: Options) -> dict[str, Any]:
    meta = {"modality": options.name, "messages": record.messages}
    if record.id is not None:
        meta["id"] = record.id
    ext, data = _input_member(record.media, options)
    return {"__key__": f"{options.modality}-{record.index:09d}",
            "json": json.dumps(meta, sort_keys=True).encode(), ext: data}


# JPEG and PNG files go into the shard as they are, once they decode: re-encoding would take
# longer than the check, and lose quality (JPEG) or grow the file (JPEG as PNG).
_KEPT_IMAGES = {b"\xff\xd8\xff": "jpg", b"\x89PNG\r\n\x1a\n": "png"}


def _input_member(url: str, options: Options) -> tuple[str, bytes]:
    """(extension, bytes) of a record's media file as a sample member (docs/DATA.md §1)."""
    if options.modality == "image":
        data = media.read_bytes(url)
        array = media.decode_image(data, url)
        for magic, ext in _KEPT_IMAGES.items():
            if data.startswith(magic):
                return ext, data
        return encode_input("image", array)
    if options.modality == "audio":
        audio = media.read_audio(url, options.sample_rate)
        return encode_input("audio", np.clip(audio, -1.0, 1.0), options.sample_rate)
    return encode_input("video", media.read_video(url, options.num_frames, options.frame_size))


# --- the report ----------------------------------------------------------------------------------

def _report(source: str, sha256: str, records: list, checked: list[dict],
            results: dict[int, dict], pattern: str | None = None) -> dict[str, Any]:
    """What a conversion wrote and skipped: the skipped records of the checks and of every
    shard, sorted by index."""
    shards = [results[k] for k in sorted(results)]
    skipped = sorted(checked + [s for r in shards for s in r["skipped"]], key=lambda s: s["index"])
    return {"input": source, "input_sha256": sha256, "records": len(records),
            "pattern": pattern, "shards": len(shards),
            "samples": sum(r["samples"] for r in shards), "skipped": len(skipped),
            "empty_shards": [r["shard"] for r in shards if r["samples"] == 0],
            "skipped_records": skipped}
