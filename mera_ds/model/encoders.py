"""Frozen modality encoders: a decoded sample -> a fixed number of feature tokens.

Each encoder turns decoded samples (docs/DATA.md) into a batch of fixed-shape tensors with
`preprocess_batch` (`preprocess`: one sample), and a batch of those into (B, num_tokens, out_dim)
features with `forward`. Encoders are never trained: parameters are frozen, the module stays in
eval mode, and forward runs without autograd.

Built-in tiny encoders (path unset) are random towers seeded from the modality name, so every
process builds the same weights; with `path` set, the tower and its processor config come from
that HF directory or id.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mera_ds.config import EncoderConfig
from mera_ds.errors import MeraError
from mera_ds.model import tiny
from mera_ds.model.node_cache import local_model


class Encoder(nn.Module):
    """Base: frozen, always in eval mode, no autograd in forward."""

    input_kind: str
    num_tokens: int
    out_dim: int

    def __init__(self, modality: str):
        super().__init__()
        self.modality = modality

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        # The MLLM is put in train mode as a whole; a frozen encoder keeps eval behaviour
        # (no dropout), so its features are the same in training and evaluation.
        return super().train(False)

    def preprocess(self, sample: dict) -> torch.Tensor:
        return self.preprocess_batch([sample])[0]

    def preprocess_batch(self, samples: list[dict]) -> torch.Tensor:
        """The samples' inputs, stacked: (B, ...)."""
        for sample in samples:
            kind = sample.get("input_kind")
            if kind != self.input_kind:
                raise MeraError(f"sample {sample.get('__key__', '?')}: modality "
                                f"{self.modality!r} expects input_kind {self.input_kind!r}, "
                                f"got {kind!r}")
        return self._preprocess_batch(samples)

    def _preprocess_batch(self, samples: list[dict]) -> torch.Tensor:
        return torch.stack([self._preprocess(s) for s in samples])

    def _preprocess(self, sample: dict) -> torch.Tensor:
        raise NotImplementedError

    def _dtype(self) -> torch.dtype:
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.float32


class VisionTower(nn.Module):
    """A CLIP- or SigLIP-style vision transformer and its pixel transform. Features are the patch
    tokens of the penultimate layer, as LLaVA uses them (CLIP's class token dropped; SigLIP has
    none)."""

    def __init__(self, modality: str, cfg: EncoderConfig, overrides: dict):
        super().__init__()
        from transformers import CLIPVisionModel

        siglip = False
        if cfg.path is None:
            config = tiny.tiny_clip_vision_config(overrides, f"modalities[{modality}].encoder")
            with tiny.seeded(tiny.modality_seed(modality)):
                self.model = CLIPVisionModel(config)
            self.resize = self.crop = config.image_size
            self.mean = self.std = (0.5, 0.5, 0.5)
        else:
            from transformers import AutoConfig, AutoImageProcessor, SiglipVisionModel

            with local_model(cfg.path) as path:
                kind = AutoConfig.from_pretrained(path).model_type
                if kind not in VISION_TOWERS:
                    raise MeraError(f"modalities[{modality}].encoder.path: {cfg.path} is a "
                                    f"{kind!r} model, not a vision tower "
                                    f"({', '.join(sorted(VISION_TOWERS))})")
                siglip = VISION_TOWERS[kind] == "siglip"
                self.model = (SiglipVisionModel if siglip else CLIPVisionModel) \
                    .from_pretrained(path)
                proc = AutoImageProcessor.from_pretrained(path)
            size = dict(proc.size)
            self.resize = size.get("shortest_edge") or size["height"]
            self.crop = self.resize if siglip else dict(proc.crop_size)["height"]
            self.mean, self.std = tuple(proc.image_mean), tuple(proc.image_std)
        # Plain tensors, not buffers: pixels run in the loader, on the CPU, wherever the model is.
        self._mean, self._std = (torch.tensor(v).view(3, 1, 1) for v in (self.mean, self.std))
        config = self.model.config
        self.squash = siglip  # resize to the square as it is, else the short side, then crop
        self.cls_tokens = 0 if siglip else 1
        self.grid = config.image_size // config.patch_size
        self.hidden = config.hidden_size

    def pixels(self, images: np.ndarray) -> torch.Tensor:
        """(B, H, W) or (B, H, W, C) floats in [0, 1] -> normalised (B, 3, crop, crop): resize
        the short side, centre-crop, as CLIP's processor does (SigLIP's: resize to the square)."""
        x = torch.as_tensor(np.ascontiguousarray(images), dtype=torch.float32)
        if x.ndim == 3:
            x = x[..., None]
        x = x.permute(0, 3, 1, 2)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 4:  # RGBA: drop alpha
            x = x[:, :3]
        h, w = x.shape[2:]
        scale = self.resize / min(h, w)
        size = (self.crop, self.crop) if self.squash else \
            (max(self.crop, round(h * scale)), max(self.crop, round(w * scale)))
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True,
                              align_corners=False).clamp(0, 1)
        top, left = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
        x = x[:, :, top:top + self.crop, left:left + self.crop]
        return (x - self._mean) / self._std

    def pixels_of(self, images: list[np.ndarray]) -> torch.Tensor:
        """`pixels` of images of any shapes: in one batch where they all have the same shape (the
        usual case: on small images the cost of each torch call is most of the time)."""
        if len({x.shape for x in images}) == 1:
            return self.pixels(np.stack(images))
        return torch.cat([self.pixels(x[None]) for x in images])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, grid*grid, hidden)."""
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[-2][:, self.cls_tokens:]


# model_type of an HF vision checkpoint (a whole model or its vision tower) -> its family.
VISION_TOWERS = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip",
                 "siglip_vision_model": "siglip"}


def _image01(sample: dict) -> np.ndarray:
    x = np.asarray(sample["input"])
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    return np.clip(x.astype(np.float32), 0.0, 1.0)


class ClipVisionEncoder(Encoder):
    input_kind = "image"

    def __init__(self, modality: str, cfg: EncoderConfig, overrides: dict):
        super().__init__(modality)
        self.tower = VisionTower(modality, cfg, overrides)
        self.num_tokens = self.tower.grid ** 2
        self.out_dim = self.tower.hidden

    def _preprocess_batch(self, samples: list[dict]) -> torch.Tensor:
        return self.tower.pixels_of([self._image(s) for s in samples])

    def _image(self, sample: dict) -> np.ndarray:
        """The sample's image as floats in [0, 1], (H, W) or (H, W, C)."""
        x = np.asarray(sample["input"])
        if x.ndim not in (2, 3):
            raise MeraError(f"sample {sample.get('__key__', '?')}: image of shape {x.shape}, "
                            "expected (H, W) or (H, W, C)")
        return _image01(sample)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tower(x.to(self._dtype()))


class VideoEncoder(Encoder):
    """The image tower over `num_frames` frames sampled uniformly from the clip. Each frame's patch
    tokens are pooled to a coarse `spatial_grid` x `spatial_grid` grid, flattened into one token
    (a plain spatial mean would lose where things are, and with it the motion). Two streams, as in
    two-stream video networks: appearance (the frame tokens) and motion (differences of
    consecutive frame tokens), each pooled in time to `time_tokens` tokens in order, concatenated
    per token. Without the motion stream the connector, which sees one token at a time, passes
    no motion on, and the LLM has to learn to subtract frames by itself: a tiny LLM stays at
    chance on the built-in direction task for hundreds of steps."""

    input_kind = "video"

    def __init__(self, modality: str, cfg: EncoderConfig, overrides: dict, spatial_grid: int):
        super().__init__(modality)
        self.tower = VisionTower(modality, cfg, overrides)
        self.num_frames = cfg.num_frames
        self.spatial_grid = min(spatial_grid, self.tower.grid)
        self.num_tokens = cfg.time_tokens
        self.out_dim = 2 * self.tower.hidden * self.spatial_grid ** 2

    def _preprocess(self, sample: dict) -> torch.Tensor:
        x = np.asarray(sample["input"])
        if x.ndim not in (3, 4) or x.shape[0] < 1:
            raise MeraError(f"sample {sample.get('__key__', '?')}: video of shape {x.shape}, "
                            "expected (T, H, W) or (T, H, W, C)")
        idx = np.linspace(0, x.shape[0] - 1, self.num_frames).round().astype(int)
        return self.tower.pixels(_image01({"input": x[idx]}))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        patches = self.tower(x.flatten(0, 1).to(self._dtype()))  # (B*T, grid*grid, D)
        g, d = self.tower.grid, self.tower.hidden
        grid = patches.transpose(1, 2).reshape(b * t, d, g, g)
        frames = F.adaptive_avg_pool2d(grid, self.spatial_grid).reshape(b, t, -1)
        motion = frames[:, 1:] - frames[:, :-1] if t > 1 else torch.zeros_like(frames)
        return torch.cat([self._in_time(frames), self._in_time(motion)], dim=-1)

    def _in_time(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool1d(tokens.transpose(1, 2), self.num_tokens).transpose(1, 2)


class DepthEncoder(ClipVisionEncoder):
    """The image tower over the depth map: non-finite values (no return) set to the farthest
    finite depth, min-max normalised per map (near = bright), repeated to 3 channels."""

    input_kind = "depth"

    def _image(self, sample: dict) -> np.ndarray:
        d = np.asarray(sample["input"], dtype=np.float32)
        if d.ndim != 2:
            raise MeraError(f"sample {sample.get('__key__', '?')}: depth map of shape {d.shape}, "
                            "expected (H, W)")
        finite = np.isfinite(d)
        if not finite.any():
            raise MeraError(f"sample {sample.get('__key__', '?')}: depth map has no finite value")
        far, near = d[finite].max(), d[finite].min()
        d = np.where(finite, d, far)
        return (far - d) / (far - near) if far > near else np.zeros_like(d)


class WhisperAudioEncoder(Encoder):
    """A Whisper encoder over log-mel features of the clip (padded or cut to the encoder's
    window), its output frames average-pooled in time to `num_tokens` tokens. The features are
    those of the checkpoint's WhisperFeatureExtractor (its settings and mel filters), computed
    as its torch path computes them, op for op, but without its per-call wrapping and with a
    cheaper |STFT|: the same values, bit for bit (tests compare), in about half the time."""

    input_kind = "audio"

    def __init__(self, modality: str, cfg: EncoderConfig, overrides: dict, num_tokens: int):
        super().__init__(modality)
        from transformers import WhisperFeatureExtractor
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        if cfg.path is None:
            config = tiny.tiny_whisper_config(overrides, f"modalities[{modality}].encoder")
            with tiny.seeded(tiny.modality_seed(modality)):
                self.model = WhisperEncoder(config)
            # One chunk of the tiny window: max_source_positions * 2 frames of 10 ms each.
            seconds = config.max_source_positions * 2 * 160 / 16000
            if seconds != int(seconds):
                raise MeraError(f"modalities[{modality}].encoder.tiny.max_source_positions: "
                                f"must be a multiple of 50 (1 s windows), got "
                                f"{config.max_source_positions}")
            self.features = WhisperFeatureExtractor(feature_size=config.num_mel_bins,
                                                    chunk_length=int(seconds))
        else:
            from transformers import WhisperModel

            with local_model(cfg.path) as path:
                self.model = WhisperModel.from_pretrained(path).get_encoder()
                self.features = WhisperFeatureExtractor.from_pretrained(path)
        self.num_tokens = num_tokens
        self.out_dim = self.model.config.d_model
        # Plain tensors, not buffers: not in the state dict, and never cast to the model's dtype.
        self.window = torch.hann_window(self.features.n_fft)
        self.mel = torch.from_numpy(self.features.mel_filters).to(torch.float32)

    def _preprocess_batch(self, samples: list[dict]) -> torch.Tensor:
        """(B, n_samples): the clips padded or cut to the window. The log-mel features are made
        in `forward`, on the encoder's device, where a batch's STFT costs next to nothing; in
        the loader they were 3/4 of the Collator's time for an audio sample."""
        f = self.features
        x = np.full((len(samples), f.n_samples), f.padding_value, dtype=np.float32)
        for row, sample in zip(x, samples):
            wav = self._wave(sample)
            row[:min(len(wav), f.n_samples)] = wav[:f.n_samples]
        return torch.from_numpy(x)

    def log_mel(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_samples) clips -> (B, feature_size, frames) float32: what `self.features` gives
        the clips (see the class)."""
        f = self.features
        x = x.float()
        if f.dither:
            x = x + f.dither * torch.randn(x.shape, device=x.device)
        stft = torch.stft(x, f.n_fft, f.hop_length, window=self.window.to(x.device),
                          return_complex=True)
        # The extractor's |frames| ** 2. torch's abs of a complex tensor is this hypot of its
        # parts, made 3x slower by a complex temporary; the parts are sliced as the extractor
        # slices the frames, so that each element goes through the same (vectorised or scalar)
        # code and rounds the same.
        magnitudes = torch.hypot(stft.real.contiguous()[..., :-1],
                                 stft.imag.contiguous()[..., :-1]) ** 2
        log_spec = torch.clamp(self.mel.to(x.device).T @ magnitudes.contiguous(),
                               min=1e-10).log10()
        top = log_spec.max(dim=2, keepdim=True)[0].max(dim=1, keepdim=True)[0]
        return (torch.maximum(log_spec, top - 8.0) + 4.0) / 4.0

    def _wave(self, sample: dict) -> np.ndarray:
        """The sample's audio: mono, at the extractor's sampling rate."""
        wav = np.asarray(sample["input"], dtype=np.float32)
        if wav.ndim == 2:  # (n, channels) -> mono
            wav = wav.mean(axis=1)
        if wav.ndim != 1:
            raise MeraError(f"sample {sample.get('__key__', '?')}: audio of shape {wav.shape}, "
                            "expected (n,)")
        sr, target = int(sample.get("sample_rate", self.features.sampling_rate)), \
            self.features.sampling_rate
        if sr != target:  # linear resampling is enough for a 16 kHz encoder window
            n = int(round(len(wav) * target / sr))
            wav = np.interp(np.arange(n) * sr / target, np.arange(len(wav)), wav).astype(np.float32)
        return wav

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.model(input_features=self.log_mel(x).to(self._dtype())).last_hidden_state
        return F.adaptive_avg_pool1d(h.transpose(1, 2), self.num_tokens).transpose(1, 2)


class PrecomputedEncoder(Encoder):
    """Features computed offline and stored in the shards, (N, feature_dim): no encoder runs;
    N is average-pooled to `num_tokens` so every sample takes the same number of tokens."""

    input_kind = "features"

    def __init__(self, modality: str, cfg: EncoderConfig, num_tokens: int):
        super().__init__(modality)
        self.num_tokens = num_tokens
        self.out_dim = cfg.feature_dim

    def _preprocess(self, sample: dict) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(sample["input"], dtype=np.float32))
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.out_dim or x.shape[0] < 1:
            raise MeraError(f"sample {sample.get('__key__', '?')}: features of shape "
                            f"{tuple(x.shape)}, expected (N, {self.out_dim})")
        return F.adaptive_avg_pool1d(x.T[None], self.num_tokens)[0].T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()


def build_encoder(modality: str, cfg: EncoderConfig) -> Encoder:
    """The frozen encoder of one modality, from its config."""
    overrides = dict(cfg.tiny)
    if cfg.type == "precomputed" and overrides:
        raise MeraError(f"modalities[{modality}].encoder.tiny: unknown field(s) "
                        f"{', '.join(sorted(overrides))} for a precomputed encoder")
    if cfg.type == "clip_vision":
        enc = ClipVisionEncoder(modality, cfg, overrides)
    elif cfg.type == "depth":
        enc = DepthEncoder(modality, cfg, overrides)
    elif cfg.type == "video":
        enc = VideoEncoder(modality, cfg, overrides, cfg.spatial_grid)
    elif cfg.type == "whisper":
        enc = WhisperAudioEncoder(modality, cfg, overrides, cfg.num_tokens)
    else:
        enc = PrecomputedEncoder(modality, cfg, cfg.num_tokens)
    enc.freeze()
    return enc
