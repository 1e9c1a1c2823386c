"""Reading WebDataset shards (tar files) from local paths and s3:// URLs: which shards a pattern
names, which of them a rank reads, and their raw (undecoded) samples.

The tar reading is ours, not webdataset's, because webdataset's tar iterator ends quietly at a bad
header and its errors lose the shard and sample names: here every bad shard stops with a one-line
CorruptDataError naming the shard URL and the sample being read, and a shard that cannot be
reached (denied, missing, a network failure) is a plain MeraError, never taken for corrupt data.
Nor is it tarfile's, which both build on: its header parsing costs more than decoding a sample
(`_members`).
"""
from __future__ import annotations

import bz2
import concurrent.futures as cf
import functools
import glob
import gzip
import io
import lzma
import re
import tarfile
import zlib
from typing import IO, Any, Callable, Iterable, Iterator, Sequence

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


_BLOCK = 512
_END = bytes(_BLOCK)
_COMPRESSED = {b"\x1f\x8b": gzip.GzipFile, b"BZh": bz2.BZ2File, b"\xfd7zXZ": lzma.LZMAFile}
_FILE = (b"0", b"\0", b"7")  # regular files (7: contiguous); other members are not samples


class _Truncated(tarfile.ReadError):
    """A member's data ends early; `member` is its name where it is a file."""

    def __init__(self, member: str | None):
        super().__init__("unexpected end of data")
        self.member = member


def _number(field: bytes) -> int:
    """A header's numeric field: octal text, or base-256 (GNU, for sizes of 8 GiB and more)."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise tarfile.ReadError(f"bad number {field!r} in a header (not a tar?)") from None


def _checksum_ok(header: bytes) -> bool:
    """The stored checksum is the sum of the header's bytes, its own field counted as spaces;
    some old tars summed them as signed chars."""
    stored = _number(header[148:156])
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    return stored == unsigned or stored == unsigned - 256 * sum(
        b >= 128 for b in header[:148] + header[156:])


def _pax(data: bytes) -> dict[bytes, bytes]:
    """The records ("<len> <key>=<value>\\n") of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        length = int(data[pos:data.index(b" ", pos)])
        key, _, value = data[data.index(b" ", pos) + 1:pos + length - 1].partition(b"=")
        records[key] = value
        pos += length
    return records


def _members(f) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file of a tar stream, in order (ustar, GNU long names and pax
    headers). tarfile parses each header in Python at about 45 us a member, more than decoding a
    small image; this reads a header with a few slices. Unlike tarfile, it ends only at a real
    end-of-archive block: a truncated shard, or one cut at a member boundary, is an error, never
    a shorter shard; a header whose checksum does not match is one too."""
    long_name = pax_size = None
    while True:
        header = f.read(_BLOCK)
        if header == _END:
            return
        if len(header) != _BLOCK:
            raise tarfile.ReadError("unexpected end of data: no end-of-archive block"
                                    if not header else "truncated header")
        if not _checksum_ok(header):
            raise tarfile.ReadError("bad header checksum (truncated or not a tar)")
        kind = header[156:157]
        size = _number(header[124:136]) if pax_size is None else pax_size
        name = long_name
        if name is None:
            name = header[:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            if prefix:
                name = prefix + b"/" + name
        data = f.read((size + _BLOCK - 1) & ~(_BLOCK - 1))
        if len(data) < size:
            raise _Truncated(name.decode("utf-8", "surrogateescape") if kind in _FILE else None)
        data = data[:size]
        if kind == b"L":  # GNU long name: the name of the next member
            long_name = data.rstrip(b"\0")
        elif kind == b"x":  # pax: path and size of the next member
            try:
                records = _pax(data)
                pax_size = int(records[b"size"]) if b"size" in records else None
            except ValueError:
                raise tarfile.ReadError("bad pax header") from None
            long_name = records.get(b"path", long_name)
        elif kind != b"g":
            long_name = pax_size = None
            if kind in _FILE:
                yield name.decode("utf-8", "surrogateescape"), data


def _uncompressed(f):
    """The tar stream of a shard, uncompressed if it is gzip, bzip2 or xz (by its magic)."""
    magic = f.read(6)
    f.seek(0)
    for head, opener in _COMPRESSED.items():
        if magic.startswith(head):
            return opener(fileobj=f) if opener is gzip.GzipFile else opener(f)
    return f


# Remote shards are read ahead, so that a step does not wait for S3 between shards or blocks: a
# shard up to WHOLE bytes is fetched whole while the one before it is read; a larger one is read
# in blocks of BLOCK, the next fetched while one is parsed (fsspec's background cache). A stream
# holds at most two shards or two blocks. Local files have the kernel's read-ahead.
WHOLE = 16 << 20
BLOCK = 16 << 20


def open_shard(url: str) -> IO[bytes]:
    """The shard's bytes as a file, for `raw_samples`: a remote one read ahead (WHOLE, BLOCK)."""
    if not storage.is_remote(url):
        return storage.open_url(url, "rb")
    fs, path = storage.url_to_fs(url)
    with storage.accessing(url):
        size = fs.size(path)
        if size <= WHOLE:
            return io.BytesIO(fs.cat_file(path))
        return fs.open(path, "rb", block_size=BLOCK, cache_type="background",
                       cache_options={"maxblocks": 2}, size=size)


def opened_ahead(urls: Iterable[str]) -> Iterator[tuple[str, Callable[[], IO[bytes]]]]:
    """(url, opener) of each shard in order, for `raw_samples(url, opener)`; a remote shard is
    opened (and a small one fetched) in a background thread while the one before it is read.
    The order of `urls` is not changed; it is only asked for one shard earlier."""
    pool = cf.ThreadPoolExecutor(1, thread_name_prefix="shard-ahead")

    def start(url: str | None) -> Callable[[], IO[bytes]] | None:
        if url is None:
            return None
        if not storage.is_remote(url):
            return functools.partial(open_shard, url)
        return pool.submit(open_shard, url).result

    try:
        urls = iter(urls)
        url = next(urls, None)
        opener = start(url)
        while url is not None:
            following = next(urls, None)
            ahead = start(following)
            yield url, opener
            url, opener = following, ahead
    finally:  # a stream left early: what is being fetched is dropped when it arrives
        pool.shutdown(wait=False, cancel_futures=True)


def raw_samples(url: str, opener: Callable[[], IO[bytes]] | None = None
                ) -> Iterator[dict[str, Any]]:
    """The undecoded samples of one shard: {"__key__", "__url__", <extension>: bytes, ...};
    `opener` gives its bytes (`opened_ahead`), by default `open_shard(url)`.

    Raises CorruptDataError (kind "shard") naming the shard and the sample being read when the tar
    is truncated or malformed; a missing shard is a plain MeraError.
    """
    key = None
    current: dict[str, Any] | None = None
    try:
        with (opener or functools.partial(open_shard, url))() as f:
            for name, data in _members(_uncompressed(f)):
                prefix, ext = _base_plus_ext(name)
                if prefix is None or prefix.rsplit("/", 1)[-1].startswith("__"):
                    continue  # not a sample member (webdataset's __meta__ convention)
                key = prefix
                if current is not None and current["__key__"] != prefix:
                    yield current  # complete: hand it on before reading further
                    current = None
                if current is None:
                    current = {"__key__": prefix, "__url__": url}
                if ext in current:
                    raise CorruptDataError(f"{url}: sample {prefix!r}: duplicate member {ext!r}",
                                           kind="shard")
                current[ext] = data
    except MeraError:
        raise
    except FileNotFoundError as e:
        raise (storage.access_error(url, e) or MeraError(f"{url}: no such shard")) from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError) as e:
        if isinstance(e, _Truncated) and e.member:  # name the sample whose member was cut
            prefix = _base_plus_ext(e.member)[0]
            if current is not None and prefix not in (None, current["__key__"]):
                yield current  # a new sample's header was read: the one before is complete
            key = prefix or key
        where = f"at sample {key!r}" if key else "before its first sample"
        raise CorruptDataError(f"{url}: corrupt shard {where}: {e}", kind="shard") from None
    except Exception as e:
        # Denied, unreachable, or an I/O error: not the data's fault, so never skipped as corrupt.
        err = storage.access_error(url, e) or MeraError(
            f"{url}: cannot read shard: {type(e).__name__}: {e}")
        raise err from e
    if current is not None:
        yield current
