"""Reading WebDataset shards (tar files) from local paths and s3:// URLs: which shards a pattern
names, which of them a rank reads, and their raw (undecoded) samples.

The tar reading is ours, not webdataset's, because webdataset's tar iterator ends quietly at a bad
header and its errors lose the shard and sample names: here every bad shard stops with a one-line
CorruptDataError naming the shard URL and the sample being read, and a shard that cannot be
reached (denied, missing, a network failure) is a plain MeraError, never taken for corrupt data.
"""
from __future__ import annotations

import glob
import gzip
import re
import tarfile
import zlib
from typing import Any, Iterator, Sequence

import braceexpand

from mera_ds import storage
from mera_ds.errors import MeraError


class CorruptDataError(MeraError):
    """A shard or sample that cannot be read; `kind` is "shard" or "sample"."""

    def __init__(self, message: str, kind: str = "sample"):
        super().__init__(message)
        self.kind = kind



def expand_shards(pattern: str) -> list[str]:
    """The shard URLs of a brace pattern ("dir/train-{000000..000003}.tar"); parts with glob
    wildcards are listed from storage. Fails if nothing matches."""
    if not pattern or not pattern.strip():
        raise MeraError("empty shard pattern")
    try:
        parts = list(braceexpand.braceexpand(pattern))
    except braceexpand.UnbalancedBracesError:
        raise MeraError(f"{pattern}: unbalanced braces in shard pattern") from None
    urls = []
    for part in parts:
        if not glob.has_magic(part):
            urls.append(part)
            continue
        fs, path = storage.url_to_fs(part)
        scheme = part.split("://", 1)[0] + "://" if storage.is_remote(part) else ""
        urls.extend(scheme + p for p in sorted(fs.glob(path)))
    if not urls:
        raise MeraError(f"{pattern}: no shards matched")
    return urls


def existing_shards(pattern: str) -> list[str]:
    """The shard URLs of `pattern`, each checked to exist (one listing per directory): what a
    run checks before any job starts, so a typo costs seconds rather than a started job."""
    urls = expand_shards(pattern)
    listed: dict[str, set[str]] = {}
    for url in urls:
        head = _parent(url)
        if head not in listed:
            fs, path = storage.url_to_fs(head)
            with storage.accessing(url):
                try:
                    listed[head] = {p.rstrip("/").rsplit("/", 1)[-1]
                                    for p in fs.ls(path, detail=False)}
                except (FileNotFoundError, NotADirectoryError) as e:
                    if "bucket" in str(e).lower():
                        raise
                    listed[head] = set()
    missing = [u for u in urls if u.rsplit("/", 1)[-1] not in listed[_parent(u)]]
    if len(missing) == len(urls) > 1:
        raise MeraError(f"{pattern}: no shards matched")
    if missing:
        raise MeraError(f"{missing[0]}: no such shard ({len(missing)} of the {len(urls)} "
                        f"shards of {pattern} are missing)")
    return urls


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def rank_shards(pattern: str, urls: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The shards of one rank: disjoint across ranks, together all of them."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise MeraError(f"bad rank {rank} for world size {world_size}")
    if len(urls) < world_size:
        raise MeraError(f"{pattern}: {len(urls)} shard(s) for {world_size} ranks; every rank "
                        "needs a shard of its own (write more, smaller shards)")
    return list(urls[rank::world_size])


def _base_plus_ext(name: str) -> tuple[str | None, str | None]:
    """("dir/key", "video.npy") from "dir/key.video.npy": the key ends at the first dot."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile ends an archive quietly at a missing, short or garbled header, so a truncated shard
    would just look shorter; only a real end-of-archive block ends it here."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as e:
            raise tarfile.ReadError(f"{e} at byte {tf.offset} (truncated or not a tar)") from None


def raw_samples(url: str) -> Iterator[dict[str, Any]]:
    """The undecoded samples of one shard: {"__key__", "__url__", <extension>: bytes, ...}.

    Raises CorruptDataError (kind "shard") naming the shard and the sample being read when the tar
    is truncated or malformed; a missing shard is a plain MeraError.
    """
    key = None
    current: dict[str, Any] | None = None
    try:
        with storage.open_url(url, "rb") as f, \
                tarfile.open(fileobj=f, mode="r|*", tarinfo=_StrictTarInfo) as tar:
            for member in tar:
                if not member.isreg():
                    continue
                prefix, ext = _base_plus_ext(member.name)
                if prefix is None or prefix.rsplit("/", 1)[-1].startswith("__"):
                    continue  # not a sample member (webdataset's __meta__ convention)
                key = prefix
                if current is not None and current["__key__"] != prefix:
                    yield current  # complete: hand it on before reading further
                    current = None
                if current is None:
                    current = {"__key__": prefix, "__url__": url}
                data = tar.extractfile(member).read()
                if ext in current:
                    raise CorruptDataError(f"{url}: sample {prefix!r}: duplicate member {ext!r}",
                                           kind="shard")
                current[ext] = data
    except MeraError:
        raise
    except FileNotFoundError as e:
        raise (storage.access_error(url, e) or MeraError(f"{url}: no such shard")) from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        where = f"at sample {key!r}" if key else "before its first sample"
        raise CorruptDataError(f"{url}: corrupt shard {where}: {e}", kind="shard") from None
    except Exception as e:
        # Denied, unreachable, or an I/O error: not the data's fault, so never skipped as corrupt.
        err = storage.access_error(url, e) or MeraError(
            f"{url}: cannot read shard: {type(e).__name__}: {e}")
        raise err from e
    if current is not None:
        yield current
