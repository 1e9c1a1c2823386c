"""The shared causal LLM and its tokenizer: the built-in tiny Llama, or any HF causal LM.

`build_llm` only creates the model through AutoModelForCausalLM.from_config / from_pretrained and
never touches the weights afterwards in Python, so the finetune job can call it under DeepSpeed's
HfDeepSpeedConfig and the LLM is created partitioned (ZeRO-3) from the start.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from typing import Optional

import torch
from tokenizers import AddedToken

from mera_ds.config import LLMConfig
from mera_ds.errors import MeraError
from mera_ds.model import tiny
from mera_ds.model.node_cache import local_model
from mera_ds.model.tiny import PLACEHOLDER
from mera_ds.storage import is_remote, join, url_to_fs, write_bytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def attn_implementation(llm_cfg: LLMConfig) -> str:
    """`auto`: FlashAttention-2 where it can run (installed, a GPU, half precision); else, on a
    GPU, PyTorch's flex attention; else SDPA. Packed training rows need a varlen or block-mask
    kernel: SDPA runs them on its slow masked path (BENCHMARKS.md, finetune: 0.88x vs 1.24x)."""
    if llm_cfg.attn_implementation != "auto":
        return llm_cfg.attn_implementation
    if not torch.cuda.is_available():
        return "sdpa"
    if llm_cfg.dtype != "float32" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "flex_attention"


def _with_placeholder(tokenizer):
    """An HF tokenizer gets the <modality> token (one special token) and, if it has none, a pad
    token (the eos token: padded positions are masked and never labelled)."""
    if PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(PLACEHOLDER, special=True, normalized=False)],
                             special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_tokenizer(llm_cfg: LLMConfig, path: str | None = None):
    """The tokenizer of the LLM at `path` (default: llm_cfg.path; unset: the tiny tokenizer)."""
    path = path or llm_cfg.path
    if path is None:
        return tiny.tiny_tokenizer()
    from transformers import AutoTokenizer

    with local_model(path) as local:
        try:
            tokenizer = AutoTokenizer.from_pretrained(local)
        except (OSError, ValueError) as e:
            raise MeraError(f"{path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    return _with_placeholder(tokenizer)


def build_llm(llm_cfg: LLMConfig, path: str | None = None):
    """(llm, tokenizer). `path` (an HF directory, s3:// URL or hub id; default llm_cfg.path) is
    loaded with AutoModelForCausalLM.from_pretrained; without one, the tiny Llama is created from
    its config with weights seeded the same in every process."""
    from transformers import AutoModelForCausalLM

    path = path or llm_cfg.path
    kwargs = dict(dtype=DTYPES[llm_cfg.dtype], attn_implementation=attn_implementation(llm_cfg))
    tokenizer = build_tokenizer(llm_cfg, path)
    if path is None:
        config = tiny.tiny_llama_config(llm_cfg.tiny, len(tokenizer), llm_cfg.max_length,
                                        tokenizer)
        with tiny.seeded(tiny.modality_seed("llm")):
            llm = AutoModelForCausalLM.from_config(config, **kwargs)
        return llm, tokenizer
    with local_model(path) as local:
        try:
            llm = AutoModelForCausalLM.from_pretrained(local, **kwargs)
        except (OSError, ValueError) as e:
            raise MeraError(f"{path}: cannot load a causal LM ({str(e).splitlines()[0]})") from None
    # Grow the embeddings only if the new <modality> id lies beyond them (many LLMs pad their
    # vocabulary, and a directory saved by mera-ds already has the token).
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer))
    return llm, tokenizer


def save_llm_metadata(llm, tokenizer, url: str) -> None:
    """Write everything of an HF LLM directory except the weights: config.json,
    generation_config.json and the tokenizer files. The weights are written next to them as
    sharded safetensors by the streaming writer."""
    if is_remote(url):
        fs, rpath = url_to_fs(url)
        with tempfile.TemporaryDirectory(prefix="mera-meta-") as tmp:
            save_llm_metadata(llm, tokenizer, tmp)
            for name in sorted(os.listdir(tmp)):
                fs.put_file(os.path.join(tmp, name), f"{rpath.rstrip('/')}/{name}")
        return
    path = url.removeprefix("file://")
    os.makedirs(path, exist_ok=True)
    llm.config.architectures = [type(llm).__name__]
    llm.config.save_pretrained(path)
    if llm.generation_config is not None:
        llm.generation_config.save_pretrained(path)
    tokenizer.save_pretrained(path)


def write_llm(llm_cfg: LLMConfig, url: str, shard_size: str) -> dict:
    """The LLM of `llm_cfg` as the run sees it (the tiny one, or the configured one with the
    placeholder token added) to `url` in HF layout, written whole or not at all: theta_0 of a
    run, the anchor of merges across stages, with the tensor names a finetune exports."""
    llm, tokenizer = build_llm(llm_cfg)
    return save_llm(llm, tokenizer, url, shard_size)


def save_llm(llm, tokenizer, url: str, shard_size: str,
             extra_files: Optional[dict[str, bytes]] = None) -> dict:
    """An LLM held whole in this process to `url` in HF layout, as the finetune exports one:
    the tensor names of its parameters (tied weights once), sharded safetensors, and
    `extra_files` ({name: bytes}) beside them, whole or not at all."""
    from mera_ds.io.format import TensorSpec, dtype_code
    from mera_ds.io.writer import ShardedWriter
    from mera_ds.storage import committed_dir

    tensors = list(llm.named_parameters())  # tied weights once, as the export writes them
    plan = [TensorSpec(n, dtype_code(p.dtype), tuple(p.shape)) for n, p in tensors]
    with committed_dir(url) as tmp:
        save_llm_metadata(llm, tokenizer, tmp)
        for name, data in (extra_files or {}).items():
            write_bytes(join(tmp, name), data)
        with ShardedWriter(tmp, max_shard_size=shard_size, plan=plan) as writer:
            for name, p in tensors:
                writer.add(name, p.detach())
    return {"parameters": sum(p.numel() for _, p in tensors)}
