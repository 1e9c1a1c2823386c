"""Built-in tiny models: configs small enough for CPU tests and the embedded default run, and the
word-level tokenizer of the built-in dataset.

Nothing here is downloaded. Tiny encoders are frozen random projections; their weights come from a
seed derived from the modality name, so every process and every run builds the same encoder
without saving it.
"""
from __future__ import annotations

import contextlib
import zlib
from typing import Any, Iterator

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerFast, WhisperConfig

from mera_ds.errors import MeraError

PLACEHOLDER = "<modality>"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", PLACEHOLDER]

# The template's words and the four built-in tasks (docs/DATA.md): every one is a single token.
TEMPLATE_WORDS = ["user", "assistant"]
TASK_WORDS = (
    "what digit is shown in the image which way does move video note played audio shape depth map "
    "zero one two three four five six seven eight nine left right up down "
    "do re mi fa sol la ti sphere cube cylinder cone"
).split()
PUNCTUATION = list(".,?!:;'\"-()/")
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
DIGITS = [str(d) for d in range(10)]

TINY_LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5,
                  tie_word_embeddings=False)
# Vision tower: 32x32 images in 8x8 patches (16 patch tokens). With CLIP's small default init the
# penultimate layer's patch tokens stay close to a per-token-normalised random projection of each
# patch, which keeps the built-in tasks as linearly separable as the pixels (checked in tests).
TINY_CLIP_VISION = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=64,
                        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        projection_dim=64)
# Audio tower: 40 log-mel bins x 100 frames = 1 s at 16 kHz (hop 160), 50 positions after the
# stride-2 convolution. Whisper's default init (std 0.02) leaves the convolution's output far
# below the sinusoidal position embeddings, and the LayerNorms then wash the tone out (a linear
# probe on the pooled features drops from 100% to ~70% on the note task); std 0.1 keeps it.
TINY_WHISPER = dict(num_mel_bins=40, max_source_positions=50, d_model=64, encoder_layers=2,
                    encoder_attention_heads=4, encoder_ffn_dim=128, init_std=0.1,
                    decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128)


def modality_seed(name: str) -> int:
    """Stable across processes and Python versions (unlike hash())."""
    return zlib.crc32(name.encode())


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Initialise weights from `seed` without disturbing the caller's random state."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _override(base: dict, overrides: dict[str, Any], cls, what: str):
    known = set(cls().to_dict())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise MeraError(f"{what}.tiny: unknown field(s) {', '.join(unknown)} for {cls.__name__}")
    return cls(**{**base, **overrides})


def tiny_llama_config(overrides: dict[str, Any], vocab_size: int, max_length: int,
                      tokenizer) -> LlamaConfig:
    base = dict(TINY_LLAMA, vocab_size=vocab_size,
                max_position_embeddings=max(512, max_length),
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    return _override(base, overrides, LlamaConfig, "llm")


def tiny_clip_vision_config(overrides: dict[str, Any], what: str) -> CLIPVisionConfig:
    return _override(TINY_CLIP_VISION, overrides, CLIPVisionConfig, what)


def tiny_whisper_config(overrides: dict[str, Any], what: str) -> WhisperConfig:
    return _override(TINY_WHISPER, overrides, WhisperConfig, what)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: one id per word of the template and the tasks, letters, digits, punctuation.

    Text is lower-cased and split on spaces, each punctuation mark and each digit, so any prompt
    of the built-in dataset tokenizes without <unk>, and decode joins words with single spaces.
    """
    vocab: dict[str, int] = {}
    for word in SPECIALS + TEMPLATE_WORDS + TASK_WORDS + LETTERS + DIGITS + PUNCTUATION:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    return fast_tokenizer(tok)


def fast_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """A `tokenizers` model whose vocabulary holds SPECIALS as an HF tokenizer: bos in front of
    every text, the specials named, <modality> one special token."""
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens=[PLACEHOLDER],
        clean_up_tokenization_spaces=False, model_max_length=1 << 20)
