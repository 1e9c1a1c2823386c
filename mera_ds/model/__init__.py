"""The MLLM: frozen modality encoders -> trainable connectors -> one shared causal LLM."""
from mera_ds.model.connectors import build_connector, load_connector, save_connector
from mera_ds.model.encoders import Encoder, build_encoder
from mera_ds.model.llm import build_llm, build_tokenizer, save_llm_metadata
from mera_ds.model.mllm import (MLLM, Collator, build_mllm, param_groups, set_trainable,
                                trainable_parameters)
from mera_ds.model.tiny import PLACEHOLDER, tiny_tokenizer

__all__ = ["MLLM", "Collator", "Encoder", "PLACEHOLDER", "build_connector", "build_encoder",
           "build_llm", "build_mllm", "build_tokenizer", "load_connector", "param_groups",
           "save_connector", "save_llm_metadata", "set_trainable", "tiny_tokenizer",
           "trainable_parameters"]
