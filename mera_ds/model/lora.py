"""LoRA on the shared LLM (peft): adapters on its linear layers for a finetune, and the LLM
leaving the job with them folded in, W + (alpha / r) B A, so that merge, realign and evaluate see
an ordinary HF model. The adapter itself is kept too, in peft's own layout."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from mera_ds.config import LoraConfig
from mera_ds.errors import MeraError

ADAPTER = "default"  # peft's name of the one adapter a model gets


def with_lora(llm, cfg: LoraConfig):
    """The LLM wrapped by peft with fresh adapters (B = 0: the model is unchanged until it
    trains); only the adapters require grad. Works on an LLM created under ZeRO-3: the adapters
    are created whole and DeepSpeed partitions them with the rest when the engine starts."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    layers = {name.rsplit(".", 1)[-1] for name, m in llm.named_modules()
              if isinstance(m, torch.nn.Linear)}
    missing = [t for t in cfg.target_modules if t not in layers]
    if missing:
        raise MeraError(f"stages.finetune.lora.target_modules: {', '.join(missing)} is not a "
                        f"linear layer of {type(llm).__name__} (it has "
                        f"{', '.join(sorted(layers))})")
    return get_peft_model(llm, PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM"))


def is_lora(llm) -> bool:
    return hasattr(llm, "peft_config")


# A tensor of the saved model: its name, the parameters it is made of, and how (None: the one
# parameter as it is).
Export = tuple[str, list[torch.nn.Parameter], Optional[Callable[..., torch.Tensor]]]


def adapters(llm) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter, float]]:
    """{name of an adapted weight W as the LLM saves it: (A, B, scaling)} of a LoRA-wrapped LLM:
    the layer computes with W + scaling * B @ A."""
    out = {}
    for layer_name, layer in llm.get_base_model().named_modules():
        if hasattr(layer, "lora_A") and ADAPTER in layer.lora_A:
            out[f"{layer_name}.weight"] = (layer.lora_A[ADAPTER].weight,
                                           layer.lora_B[ADAPTER].weight, layer.scaling[ADAPTER])
    return out


def merged_tensors(llm) -> list[Export]:
    """The tensors of the LLM as an HF model saves them. With LoRA, those of the base model, each
    adapted layer's weight folded: W + scaling * B @ A, in float32, cast back to W's dtype."""
    if not is_lora(llm):
        return [(name, [p], None) for name, p in llm.named_parameters()]
    adapted = adapters(llm)
    out = []
    for name, p in llm.get_base_model().named_parameters():
        if ".lora_" in name:
            continue  # part of its layer's folded weight
        name = name.replace(".base_layer.", ".")
        if name in adapted:
            a, b, scaling = adapted[name]
            out.append((name, [p, a, b], _folder(scaling)))
        else:  # not adapted, or a bias
            out.append((name, [p], None))
    return out


def _folder(scaling: float) -> Callable[..., torch.Tensor]:
    def fold(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
    return fold


def adapter_tensors(llm) -> list[Export]:
    """The adapter's tensors, named as peft saves them (adapter_model.safetensors)."""
    return [(f"base_model.model.{name.replace(f'.{ADAPTER}.', '.')}", [p], None)
            for name, p in llm.get_base_model().named_parameters() if ".lora_" in name]


def save_adapter_config(llm, directory: str, base: Optional[str]) -> None:
    """adapter_config.json, naming the LLM the adapter was trained on (`base`, an HF directory or
    id; None: the built-in tiny LLM)."""
    cfg = llm.peft_config[ADAPTER]
    cfg.base_model_name_or_path = base
    cfg.save_pretrained(directory)
