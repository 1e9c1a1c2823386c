"""The MCL benchmark's pretrained base LLM: the tiny Llama, pretrained on text before it meets any
modality, with a byte-level BPE tokenizer trained on that text (`mera shards base`).

A real MLLM's LLM already knows the words its tasks answer with, and its finetunes are small
updates to it: what makes averaging finetuned LLMs work. The benchmark's base is made so too, from
mera_ds.data.corpus (every word of the compositional tasks, in other phrasings), and written as an
HF directory that `llm.path` names, with its held-out text (`stages.eval.text`) and how it was
made (pretrain.json) beside the weights.
"""
from __future__ import annotations

import json
import logging
import math
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mera_ds.config import TrainingSettings
from mera_ds.data import corpus
from mera_ds.model import tiny

log = logging.getLogger("mera_ds.base")

HELDOUT = "heldout.txt"
ABOUT = "pretrain.json"
# Tokens per row of pretraining and of every perplexity measured (so the base's and a stage's
# are comparable).
LENGTH = 64


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2's scheme: any text encodes, decode restores spaces) with the
    specials of the tiny tokenizer, <modality> among them."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=tiny.SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tiny.fast_tokenizer(tok)


def token_rows(tokenizer, texts: list[str], length: int) -> torch.Tensor:
    """The texts as one stream, each as bos + text + eos, cut into rows of `length` tokens (the
    tail that fills no row dropped)."""
    stream = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    rows = len(stream) // length
    return torch.tensor(stream[:rows * length]).view(rows, length)


@torch.no_grad()
def perplexity(llm, rows: torch.Tensor, batch_size: int = 64) -> float:
    """exp of the mean next-token loss over every predicted token of the rows."""
    was_training = llm.training
    llm.eval()
    total, count = 0.0, 0
    for batch in rows.split(batch_size):
        batch = batch.to(llm.device)
        n = batch.numel() - len(batch)  # the first token of a row is not predicted
        total += float(llm(input_ids=batch, labels=batch).loss) * n
        count += n
    llm.train(was_training)
    return math.exp(total / count)


def pretrain_base(out: str, *, seed: int = 0, sentences: int = 40000,
                  heldout_sentences: int = 2000, vocab_size: int = 768, steps: int = 1500,
                  batch_size: int = 32, length: int = LENGTH, lr: float = 3e-3) -> dict:
    """Train the tokenizer and pretrain the tiny Llama on the corpus (next-token loss, AdamW,
    5% warm-up then cosine); write the LLM, tokenizer, held-out text and a summary to `out`
    (whole or not at all). Returns the summary, held-out perplexity included."""
    from transformers import AutoModelForCausalLM

    from mera_ds.model.llm import save_llm
    from mera_ds.train.recipe import lr_factor

    start = time.perf_counter()
    train = list(corpus.sentences(sentences, seed, "train"))
    heldout = list(corpus.sentences(heldout_sentences, seed, "eval"))
    tokenizer = train_tokenizer(train, vocab_size)
    rows, heldout_rows = token_rows(tokenizer, train, length), token_rows(tokenizer, heldout, length)
    config = tiny.tiny_llama_config({}, len(tokenizer), length, tokenizer)
    with tiny.seeded(seed):
        llm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    schedule = TrainingSettings(steps=steps, batch_size=batch_size, micro_batch_size=batch_size,
                                warmup_steps=max(1, steps // 20))
    optimizer = torch.optim.AdamW(llm.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    before = perplexity(llm, heldout_rows)
    llm.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, schedule)
        batch = rows[torch.randint(len(rows), (batch_size,), generator=generator)]
        loss = llm(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % max(1, steps // 10) == 0:
            log.info("pretrain step %d/%d loss %.4f", step + 1, steps, loss.item())
    about = {"seed": seed, "steps": steps, "batch_size": batch_size, "length": length, "lr": lr,
             "vocab_size": len(tokenizer), "train_tokens": rows.numel(),
             "epochs": steps * batch_size / len(rows), "heldout_tokens": heldout_rows.numel(),
             "heldout_perplexity_untrained": before,
             "heldout_perplexity": perplexity(llm, heldout_rows),
             "seconds": time.perf_counter() - start}
    save_llm(llm, tokenizer, out, shard_size="2GB", extra_files={
        HELDOUT: "".join(s + "\n" for s in heldout).encode(),
        ABOUT: json.dumps(about, indent=2).encode()})
    log.info("base LLM: held-out perplexity %.2f (untrained %.1f), %.0f s, in %s",
             about["heldout_perplexity"], before, about["seconds"], out)
    return about
