"""Learning without Forgetting (Li & Hoiem, 2017), as EasyCL applies it to LLMs: finetune i >= 2 of
the seq chain minimises

    CE + alpha T^2 KL(softmax(z_teacher / T) || softmax(z_student / T)),

the KL summed over the vocabulary and averaged over the answer positions (those whose next token
is labelled, as in the CE), the teacher being theta_{i-1}, frozen. It has no connector for the
new modality: it reads the student's input embeddings, detached.

The teacher is a submodule of the MLLM (MLLM.distill), created in the same ZeRO-3 scope as the
student, so the engine partitions it and gathers it layer by layer as it runs, like the frozen
LLM of a realign; it is no part of the LLM, so neither set_trainable, the optimizer, LoRA nor the
export sees it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mera_ds.model.mllm import IGNORE


class Distillation(nn.Module):
    def __init__(self, teacher: nn.Module, alpha: float, temperature: float):
        super().__init__()
        self.teacher = teacher.requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # a teacher's predictions without dropout
        return self

    def forward(self, embeds: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                **llm_inputs) -> torch.Tensor:
        """The distillation term of a batch: the student's `logits` on `embeds`, the teacher's
        computed here on the same (detached) embeddings and `llm_inputs` (masks, positions)."""
        with torch.no_grad():
            teacher = self.teacher(inputs_embeds=embeds.detach(), use_cache=False,
                                   **llm_inputs).logits
        return distillation(logits, teacher, labels, self.alpha, self.temperature)


def distillation(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                 alpha: float, temperature: float) -> torch.Tensor:
    """alpha T^2 KL(teacher || student) at temperature T, summed over the vocabulary and averaged
    over the positions that predict a labelled token (logits at p predict token p + 1)."""
    answer = labels[:, 1:] != IGNORE
    s = student[:, :-1][answer].float() / temperature
    t = teacher[:, :-1][answer].float() / temperature
    if not len(s):
        return student.sum() * 0  # in the graph all the same
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True,
                  reduction="batchmean")
    return alpha * temperature ** 2 * kl
