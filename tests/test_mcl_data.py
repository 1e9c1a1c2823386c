"""The MCL benchmark's data: the compositional task set, the corpus and the pretrained base LLM."""
import json
import os

import pytest
import torch

from mera_ds.config import LLMConfig
from mera_ds.data import corpus
from mera_ds.data.loader import read_samples
from mera_ds.data.synth import TASK_SETS, synth_dataset, synth_samples
from mera_ds.errors import MeraError
from mera_ds.model.base import ABOUT, HELDOUT, pretrain_base
from mera_ds.model.llm import build_llm
from mera_ds.model.tiny import PLACEHOLDER

COMPOSITIONAL = TASK_SETS["compositional"]


@pytest.mark.parametrize("modality", list(COMPOSITIONAL))
def test_held_out_combinations_are_only_in_eval(modality):
    """Every fifth combination of attribute values is eval-only, yet every single value is in
    training: a model can learn each word, and is tested on combinations it never saw."""
    task = COMPOSITIONAL[modality]
    train = [json.loads(s["json"]) for s in synth_samples(modality, "train", 200, 0,
                                                          "compositional")]
    eval_ = [json.loads(s["json"]) for s in synth_samples(modality, "eval", 200, 0,
                                                          "compositional")]
    held = {task.answers[k] for k in range(len(task.answers)) if task.is_held_out(k)}
    assert held and not held & {s["answer"] for s in train}
    assert not any(s["held_out"] for s in train)
    assert {s["answer"] for s in eval_ if s["held_out"]} == held
    assert all(s["answer"] == task.answers[s["label"]] for s in train + eval_)
    for j, values in enumerate(task.attributes):
        assert {task.combinations[s["label"]][j] for s in train} == set(range(len(values)))
    # Balanced: the split's combinations each occur 200 // n or one more times.
    counts = [sum(s["label"] == k for s in train) for k in task.split_combinations("train")]
    assert max(counts) - min(counts) <= 1


def test_compositional_shards_decode_with_their_held_out_flag(tmp_path):
    patterns = synth_dataset(str(tmp_path), train_per_modality=4, eval_per_modality=10,
                             samples_per_shard=10, tasks="compositional")
    samples = list(read_samples(patterns["video"]["eval"]))
    assert samples[0]["instruction"] == COMPOSITIONAL["video"].instruction
    assert {s["held_out"] for s in samples} <= {True, False}
    assert all(s["answer"] in COMPOSITIONAL["video"].answers for s in samples)
    with pytest.raises(MeraError, match="task set 'nope' is not one of classify, compositional"):
        synth_dataset(str(tmp_path / "x"), tasks="nope")


def test_the_corpus_uses_every_word_of_the_tasks():
    text = list(corpus.sentences(3000, 0))
    words = {w for line in text for w in line.split()}
    assert corpus.task_words() <= words
    # Dialogues in the prompts' template answer with the description of their user turn.
    dialogues = [line for line in text if line.startswith("user :")]
    assert 0.3 < len(dialogues) / len(text) < 0.5
    for line in dialogues[:50]:
        user, answer = line.split(" assistant : ")
        assert answer in user and answer in {a for t in COMPOSITIONAL.values() for a in t.answers}
    assert list(corpus.sentences(50, 0)) == text[:50]
    assert list(corpus.sentences(50, 0, "eval")) != text[:50]


def test_pretrained_base_loads_as_the_runs_llm(tmp_path):
    out = str(tmp_path / "base")
    about = pretrain_base(out, sentences=2000, heldout_sentences=200, steps=30, batch_size=8)
    assert about["heldout_perplexity"] < about["heldout_perplexity_untrained"] / 5
    assert json.loads(open(os.path.join(out, ABOUT)).read()) == about
    assert len(open(os.path.join(out, HELDOUT)).read().splitlines()) == 200
    llm, tokenizer = build_llm(LLMConfig(path=out))
    # <modality> was in the vocabulary from the start: no embedding was added when loading.
    assert llm.get_input_embeddings().num_embeddings == len(tokenizer) == about["vocab_size"]
    assert tokenizer.tokenize(PLACEHOLDER * 3) == [PLACEHOLDER] * 3
    answer = " a large seven at the top left"
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == answer
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    with torch.no_grad():
        assert torch.isfinite(llm(input_ids=torch.tensor([ids])).logits).all()
    with pytest.raises(MeraError, match="already exists"):
        pretrain_base(out, sentences=100, heldout_sentences=20, steps=1, batch_size=2)
