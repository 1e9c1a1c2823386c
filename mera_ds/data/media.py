"""Reading media files (images, audio, video; local or s3://) into the arrays a sample holds: what
`mera shards convert` packs into shards and `mera predict` feeds the model, so both see the same
pixels and samples.

A file that is missing or does not decode raises MediaError (a MeraError naming the path and the
cause): a bad file, which a converter may skip. Failing to reach storage at all (access denied, S3
unreachable) stays a plain MeraError: not the file's fault, so never skipped as a bad file.
"""
from __future__ import annotations

import io
import re
from math import gcd

import numpy as np

from mera_ds import storage
from mera_ds.errors import MeraError


class MediaError(MeraError):
    """A media file that is missing or does not decode."""


def read_bytes(path: str) -> bytes:
    """The whole file; MediaError if it is not there."""
    try:
        with storage.open_url(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise MediaError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise MediaError(f"{path}: is a directory, not a file") from None


def _undecodable(path: str, what: str, e: BaseException) -> MediaError:
    msg = re.sub(r"<[^<>]* at 0x[0-9a-f]+>", "the file", " ".join(str(e).split())) or "no detail"
    return MediaError(f"{path}: does not decode as {what} ({type(e).__name__}: {msg})")


def decode_image(data: bytes, path: str) -> np.ndarray:
    """Image file bytes -> uint8 (H, W, 3) RGB, any mode converted (alpha dropped, as the shard
    decoder does). `path` only names the file in errors."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # a truncated file fails here, not later in the model
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... by format
        raise _undecodable(path, "an image", e) from None


def read_image(path: str) -> np.ndarray:
    """uint8 (H, W, 3) RGB of an image file Pillow reads (PNG, JPEG, WebP, ...)."""
    return decode_image(read_bytes(path), path)


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Audio file bytes -> (float32 mono (n,), its sample rate): channels averaged. Raises what
    soundfile raises."""
    import soundfile

    audio, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    # numpy's mean over a single channel costs half as much as reading the file
    return (audio[:, 0] if audio.shape[1] == 1 else audio.mean(axis=1)), int(rate)


def read_audio(path: str, sample_rate: int) -> np.ndarray:
    """float32 mono (n,) at `sample_rate`: channels averaged, then resampled with
    scipy.signal.resample_poly (a polyphase filter with an anti-aliasing low-pass; scipy comes
    with scikit-learn). Any format libsndfile reads (WAV, FLAC, OGG, MP3...)."""
    from scipy.signal import resample_poly

    if sample_rate < 1:
        raise MeraError(f"sample rate must be >= 1, got {sample_rate}")
    data = read_bytes(path)
    try:
        mono, rate = decode_audio(data)
    except Exception as e:  # libsndfile's error, or a TypeError for a garbled header
        raise _undecodable(path, "audio", e) from None
    if mono.shape[0] == 0:
        raise MediaError(f"{path}: has no audio samples")
    if rate != sample_rate:
        g = gcd(int(rate), sample_rate)
        mono = resample_poly(mono, sample_rate // g, int(rate) // g)
    return np.asarray(mono, dtype=np.float32)


def read_video(path: str, num_frames: int, size: int | None = None) -> np.ndarray:
    """uint8 (num_frames, H, W, 3) RGB: frames spread evenly over the clip (the first and the last
    included, as the video encoder picks them; a clip shorter than num_frames repeats frames),
    decoded with PyAV, resized so the short side is `size` if given."""
    import av

    if num_frames < 1:
        raise MeraError(f"num_frames must be >= 1, got {num_frames}")
    if size is not None and size < 1:
        raise MeraError(f"frame size must be >= 1, got {size}")
    try:
        with storage.accessing(path), storage.open_url(path, "rb") as f:
            total = _frame_count(f, path)
            f.seek(0)
            wanted = np.linspace(0, total - 1, num_frames).round().astype(int).tolist()
            frames = _decode_frames(f, path, wanted, size)
    except FileNotFoundError:
        raise MediaError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise MediaError(f"{path}: is a directory, not a file") from None
    except (av.FFmpegError, ValueError, EOFError) as e:
        raise _undecodable(path, "a video", e) from None
    return np.stack(frames)


def _frame_count(f, path: str) -> int:
    """Frames in the first video stream: from the header, else by demuxing (not decoding)."""
    import av

    with av.open(f) as container:
        if not container.streams.video:
            raise MediaError(f"{path}: has no video stream")
        stream = container.streams.video[0]
        total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
    if total < 1:
        raise MediaError(f"{path}: has no video frames")
    return total


def _decode_frames(f, path: str, wanted: list[int], size: int | None) -> list[np.ndarray]:
    """RGB arrays of the frames at the indices `wanted` (sorted, may repeat), all at the size
    of the first frame (resized if `size`). A header that promised more frames than the clip
    has gives its last frame for the missing ones."""
    import av

    picked: dict[int, np.ndarray] = {}
    targets = set(wanted)
    last, shape = None, None
    with av.open(f) as container:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            if i > wanted[-1]:
                break
            shape = shape or _target_size(frame.width, frame.height, size)
            last = frame
            if i in targets:
                picked[i] = _rgb(frame, shape)
    if last is None:
        raise MediaError(f"{path}: has no video frames that decode")
    tail = _rgb(last, shape)
    return [picked.get(i, tail) for i in wanted]


def _target_size(width: int, height: int, size: int | None) -> tuple[int, int]:
    if size is None:
        return width, height
    scale = size / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _rgb(frame, shape: tuple[int, int]) -> np.ndarray:
    width, height = shape
    return frame.reformat(width=width, height=height, format="rgb24",
                          interpolation="AREA").to_ndarray()
