"""The MLLM: frozen encoders -> per-modality connectors -> one shared causal LLM.

A sample's prompt holds the `<modality>` placeholder token repeated as many times as its encoder
gives tokens; the connector outputs replace the placeholder embeddings in place (no length
change), so the LLM sees one sequence and any HF causal LM works unchanged.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from mera_ds.config import RunConfig
from mera_ds.errors import MeraError
from mera_ds.model import tiny
from mera_ds.model.ada import coefficients
from mera_ds.model.connectors import build_connector
from mera_ds.model.encoders import Encoder, build_encoder
from mera_ds.model.llm import build_llm
from mera_ds.model.lora import is_lora
from mera_ds.model.prompt import conversation, template_for
from mera_ds.model.tiny import PLACEHOLDER

IGNORE = -100  # label of positions without loss (prompt, padding)


class MLLM(nn.Module):
    def __init__(self, llm, tokenizer, encoders: dict[str, Encoder],
                 connectors: dict[str, nn.Module], max_length: int):
        super().__init__()
        self.llm = llm
        self.tokenizer = tokenizer
        # Frozen encoders are kept out of the module tree: DeepSpeed neither partitions them
        # (ZeRO-3 would gather them every step, and ranks whose batch lacks a modality would
        # not join that gather and hang) nor gives them optimizer state. They are replicated
        # on every rank and still follow .to() / .cuda() (see _apply).
        self.__dict__["encoders"] = dict(encoders)
        self.connectors = nn.ModuleDict(connectors)
        self.max_length = max_length
        self.placeholder_id = tokenizer.convert_tokens_to_ids(PLACEHOLDER)
        # LwF's frozen teacher and its term (mera_ds.model.lwf.Distillation), for a finetune
        # that distils; outside self.llm, so nothing that trains or exports the LLM sees it.
        self.distill = None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for encoder in self.encoders.values():
            encoder._apply(fn, recurse)
        return self

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    def embed(self, batch: dict) -> torch.Tensor:
        """LLM input embeddings of the batch with each sample's connector output spliced in at
        its placeholder positions."""
        embed_tokens = self.llm.get_input_embeddings()
        # Its first parameter, not .weight: a learned merge computes .weight (mera_ds.model.ada).
        ids = batch["input_ids"].to(next(embed_tokens.parameters()).device)
        embeds = embed_tokens(ids)
        features = {}
        # Every connector runs on every step, on no samples where the batch has none of its
        # modality: under ZeRO-3 all ranks then take part in the same gathers and gradient
        # reductions whatever their batches hold.
        for modality, connector in self.connectors.items():
            encoder, x = self.encoders[modality], batch["inputs"].get(modality)
            dtype = next(connector.parameters()).dtype
            if x is None:
                feats = embeds.new_zeros((0, encoder.num_tokens, encoder.out_dim), dtype=dtype)
            else:
                feats = encoder(x.to(ids.device))  # each encoder casts to its own dtype
            features[modality] = connector(feats.to(dtype)).to(embeds.dtype)
        # Rows in batch order; within a modality the collator stacked inputs in that order too.
        seen = dict.fromkeys(features, 0)
        rows = []
        for modality in batch["modalities"]:
            rows.append(features[modality][seen[modality]])
            seen[modality] += 1
        # The collator put exactly num_tokens placeholders in each row (and none elsewhere), so
        # the placeholder positions, in row-major order, match the concatenated rows one to one.
        mask = (ids == self.placeholder_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, torch.cat(rows))
        # Keep every connector in the graph, with zero weight, so its backward (ZeRO-3's
        # re-gather and gradient reduction) also runs on ranks without its modality.
        return embeds + sum(f.sum() for f in features.values()) * 0

    def forward(self, batch: dict):
        """The LLM output for a training batch; `.loss` is the mean over answer tokens (plus the
        distillation term when the model distils)."""
        embeds = self.embed(batch)
        labels = batch.get("labels")
        mask, positions = batch.get("attention_mask"), batch.get("position_ids")
        inputs = dict(attention_mask=None if mask is None else mask.to(embeds.device),
                      position_ids=None if positions is None else positions.to(embeds.device))
        labels = None if labels is None else labels.to(embeds.device)
        out = self.llm(inputs_embeds=embeds, labels=labels, use_cache=False, **inputs)
        if self.distill is not None and labels is not None:
            out.loss = out.loss + self.distill(embeds, out.logits, labels, **inputs)
        return out

    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int, **kwargs) -> list[str]:
        """Greedy answers of a generation batch (left-padded prompts). Extra keyword arguments go
        to HF generate, e.g. synced_gpus=True under ZeRO-3."""
        embeds = self.embed(batch)
        tok = self.tokenizer
        # An instruct LLM's generation config names its end-of-turn tokens (Llama-3: eot_id).
        eos = getattr(self.llm.generation_config, "eos_token_id", None) or tok.eos_token_id
        out = self.llm.generate(inputs_embeds=embeds,
                                attention_mask=batch["attention_mask"].to(embeds.device),
                                max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tok.pad_token_id, eos_token_id=eos, **kwargs)
        # With inputs_embeds only, generate returns just the new tokens.
        return [text.strip() for text in tok.batch_decode(out, skip_special_tokens=True)]


def build_mllm(run_cfg: RunConfig, modalities: list[str] | None = None, llm=None,
               tokenizer=None) -> MLLM:
    """The MLLM of `modalities` (default: all of the config, in order). Pass `llm` and
    `tokenizer` (from build_llm, e.g. created under ZeRO-3 or loaded from a stage's directory)
    to use them; otherwise the config's LLM is built. Connectors start from a seed derived from
    the run seed and the modality name, so every rank builds the same ones."""
    if (llm is None) != (tokenizer is None):
        raise TypeError("build_mllm: pass both llm and tokenizer, or neither")
    if llm is None:
        llm, tokenizer = build_llm(run_cfg.llm)
    names = [m.name for m in run_cfg.modalities] if modalities is None else list(modalities)
    hidden = llm.config.get_text_config().hidden_size
    encoders, connectors = {}, {}
    for name in names:
        cfg = run_cfg.modality(name)
        encoders[name] = build_encoder(name, cfg.encoder)
        with tiny.seeded(tiny.modality_seed(f"connector/{name}") + run_cfg.seed):
            connectors[name] = build_connector(cfg.connector.type, encoders[name].out_dim, hidden)
    return MLLM(llm, tokenizer, encoders, connectors, run_cfg.llm.max_length)


class Collator:
    """Decoded samples -> one batch for MLLM.forward (train=True) or MLLM.generate (False).

    A sample's conversation is rendered by mera_ds.model.prompt: the tokenizer's chat template,
    or the plain one, with the modality's placeholder block at the start of the first user turn.
    Training batches are right-padded and labelled on every assistant turn (with what ends it)
    and nothing else; generation batches hold every turn but a final assistant one (the answer),
    left-padded so every row ends where generation starts. A training sample too long for
    llm.max_length loses its last turns (down to the first), then, as a prompt does, the end of
    its first user text; the template, the placeholder block and the answers are never cut.

    With `pack` (training only), samples share rows of up to max_length tokens instead of each
    being padded to the longest: position_ids restart at every sample and no attention_mask is
    given, from which transformers builds block-diagonal causal attention (varlen kernels under
    FlashAttention-2), so packed samples never see each other.
    """

    def __init__(self, mllm: MLLM, train: bool, pack: bool = False):
        if pack and not train:
            raise ValueError("Collator: packing is for training batches only")
        self.encoders = mllm.encoders
        self.tokenizer = mllm.tokenizer
        self.max_length = mllm.max_length
        self.train = train
        self.pack = pack
        self.placeholder_id = mllm.placeholder_id
        self.template = template_for(self.tokenizer)

    def encode(self, sample: dict) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of one sample, before padding."""
        key = sample.get("__key__", "?")
        modality = sample.get("modality")
        if modality not in self.encoders:
            raise MeraError(f"sample {key}: modality {modality!r} has no encoder in this model "
                            f"(it has {', '.join(self.encoders)})")
        n = self.encoders[modality].num_tokens
        messages = list(conversation(sample))
        if any(PLACEHOLDER in m["content"] for m in messages):
            raise MeraError(f"sample {key}: a message contains {PLACEHOLDER}")
        if self.train and messages[-1]["role"] != "assistant":
            raise MeraError(f"sample {key}: a training conversation ends with an assistant turn")
        if not self.train and messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # the answer: generated, not given
        while True:
            pieces = self.template.pieces(messages, n)
            total = sum(len(ids) for ids, _ in pieces)
            if total <= self.max_length:
                break
            if self.train and len(messages) > 2:
                messages = messages[:-2]
                continue
            messages = self._shorten(key, modality, n, messages, total)
        ids = [i for piece, _ in pieces for i in piece]
        if ids.count(self.placeholder_id) != n:
            raise MeraError(f"sample {key}: the prompt holds {ids.count(self.placeholder_id)} "
                            f"{PLACEHOLDER} tokens, not the {n} of its {modality} input")
        labels = [i if labelled else IGNORE for piece, labelled in pieces for i in piece]
        return ids, labels

    def _shorten(self, key: str, modality: str, n: int, messages: list[dict],
                 total: int) -> list[dict]:
        """The messages with the first user text cut by as many tokens as the sample is too
        long; an error if the rest alone is too long."""
        text = self.template.content_ids(messages[0]["content"])
        keep = len(text) - (total - self.max_length)
        if keep < 0:
            raise MeraError(f"sample {key}: {n} {modality} tokens, template and answer need "
                            f"{total - len(text)} tokens, more than "
                            f"llm.max_length={self.max_length}")
        content = self.tokenizer.decode(text[:keep], skip_special_tokens=True).strip()
        return [{**messages[0], "content": content}, *messages[1:]]

    def __call__(self, samples: Iterable[dict]) -> dict:
        samples = list(samples)
        if not samples:
            raise ValueError("Collator: empty batch")
        encoded = [self.encode(s) for s in samples]
        rows = self._pack(encoded) if self.pack else [[i] for i in range(len(samples))]
        ids = [x for x, _ in encoded]
        width = max(sum(len(ids[i]) for i in row) for row in rows)
        # Samples in layout order: the placeholder blocks appear in this order in input_ids.
        samples = [samples[i] for row in rows for i in row]
        batch = {"input_ids": self._rows(rows, width, ids, self.tokenizer.pad_token_id)}
        if not self.pack:  # packed rows get position_ids instead
            batch["attention_mask"] = self._rows(rows, width, [[1] * len(x) for x in ids], 0)
        groups: dict[str, list[dict]] = {}
        for s in samples:
            groups.setdefault(s["modality"], []).append(s)
        batch.update({
            "inputs": {m: self.encoders[m].preprocess_batch(ss) for m, ss in groups.items()},
            "modalities": [s["modality"] for s in samples],
            "answers": [s["answer"] for s in samples],
            "keys": [s.get("__key__", "?") for s in samples],
            "num_tokens": sum(len(x) for x in ids),  # non-padding tokens, for throughput
        })
        if self.train:
            batch["labels"] = self._rows(rows, width, [labels for _, labels in encoded], IGNORE)
        if self.pack:
            batch["position_ids"] = self._rows(rows, width, [list(range(len(x))) for x in ids], 0)
        return batch

    def _rows(self, rows: list[list[int]], width: int, values: list[list[int]], pad: int
              ) -> torch.Tensor:
        """(len(rows), width): each row the values of its samples, one after the other, padded
        with `pad` on the right (training) or the left (generation). Made as lists and turned
        into a tensor in one call: a tensor per sample costs more than the values it holds."""
        out = []
        for row in rows:
            flat = [v for i in row for v in values[i]]
            fill = [pad] * (width - len(flat))
            out.append(flat + fill if self.train else fill + flat)
        return torch.tensor(out, dtype=torch.long)

    def _pack(self, encoded: list[tuple[list[int], list[int]]]) -> list[list[int]]:
        """First-fit decreasing of sample lengths into rows of max_length tokens."""
        rows: list[list[int]] = []
        free: list[int] = []
        for i in sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0])):
            n = len(encoded[i][0])
            for r, room in enumerate(free):
                if n <= room:
                    rows[r].append(i)
                    free[r] -= n
                    break
            else:
                rows.append([i])
                free.append(self.max_length - n)
        return rows


def set_trainable(mllm: MLLM, llm: bool, connectors: list[str], merge: bool = False) -> None:
    """Freeze everything, then unfreeze the LLM (if `llm`; its adapters if it has LoRA), the
    coefficients of a learned merge (if `merge`) and the named connectors.
    Encoders are never trained."""
    mllm.requires_grad_(False)
    for lam in coefficients(mllm.llm).values():
        lam.requires_grad_(merge)
    if llm:  # a LoRA-wrapped LLM trains its adapters only
        lora = is_lora(mllm.llm)
        for name, p in mllm.llm.named_parameters():
            p.requires_grad_(not lora or ".lora_" in name)
    for name in connectors:
        if name not in mllm.connectors:
            raise MeraError(f"no connector for modality {name!r} (the model has "
                            f"{', '.join(mllm.connectors)})")
        mllm.connectors[name].requires_grad_(True)


def trainable_parameters(mllm: MLLM) -> dict[str, list[nn.Parameter]]:
    """{"llm": [...], "merge": [...], "connectors": [...]}: the parameters that require grad, by
    kind (merge: a learned merge's coefficients)."""
    merge = [p for p in coefficients(mllm.llm).values() if p.requires_grad]
    return {"llm": [p for p in mllm.llm.parameters()
                    if p.requires_grad and not any(p is q for q in merge)],
            "merge": merge,
            "connectors": [p for p in mllm.connectors.parameters() if p.requires_grad]}


def param_groups(mllm: MLLM, lr_llm: float, lr_connector: float, lr_merge: float = 0.0,
                 weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups with the per-kind learning rates of the finetune phase (the
    paper: 2e-4 for the LLM, 2e-5 for the connector); groups without trainable parameters are
    left out. A learned merge's coefficients are never decayed (toward 0: no merge at all)."""
    lrs = {"llm": lr_llm, "merge": lr_merge, "connectors": lr_connector}
    return [{"name": kind, "params": params, "lr": lrs[kind],
             "weight_decay": 0.0 if kind == "merge" else weight_decay}
            for kind, params in trainable_parameters(mllm).items() if params]
