"""mera-ds: modality-incremental training of multimodal LLMs with MERA (Merge then Realign)."""

__version__ = "0.1.0"
