"""Prompts of conversations: the tokenizer's chat template (an HF LLM saved locally) or the plain
one; loss on every assistant turn and nothing else; the generation prompt; truncation."""
import io
import json

import numpy as np
import pytest
import torch

from mera_ds.config import parse_config
from mera_ds.data.decode import decode_sample
from mera_ds.data.tar import CorruptDataError
from mera_ds.model.mllm import IGNORE, Collator, build_mllm
from mera_ds.model.prompt import text_ids
from mera_ds.model.tiny import PLACEHOLDER, tiny_tokenizer
from tests.hf_models import save_llama

MESSAGES = [{"role": "user", "content": "what digit is shown ?"},
            {"role": "assistant", "content": "seven"},
            {"role": "user", "content": "which way does the digit move ?"},
            {"role": "assistant", "content": "left up"}]


def image_sample(messages=MESSAGES, key="s0"):
    return {"__key__": key, "modality": "image", "input_kind": "image",
            "input": np.zeros((32, 32), np.uint8), "messages": messages,
            "instruction": messages[0]["content"], "answer": messages[-1]["content"]}


def mllm_of(llm: dict):
    return build_mllm(parse_config({
        "run_dir": "/tmp/unused", "llm": llm, "cluster": {"num_workers": 1},
        "modalities": [{"name": "image", "encoder": {"type": "clip_vision"},
                        "train_shards": "x", "eval_shards": "y"}]}))


@pytest.fixture(scope="module")
def chat_mllm(tmp_path_factory):
    return mllm_of({"path": save_llama(str(tmp_path_factory.mktemp("llm"))), "max_length": 96})


def labelled_spans(tok, ids, labels):
    """The decoded runs of consecutive labelled tokens."""
    spans, run = [], []
    for i, lab in zip(ids.tolist(), labels.tolist()):
        if lab != IGNORE:
            assert lab == i
            run.append(i)
        elif run:
            spans.append(tok.decode(run))
            run = []
    return spans + ([tok.decode(run)] if run else [])


def test_chat_template_multi_turn_labels_every_answer(chat_mllm):
    tok, n = chat_mllm.tokenizer, chat_mllm.encoders["image"].num_tokens
    batch = Collator(chat_mllm, train=True)([image_sample()])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    # The whole conversation as the template renders it, the image block first in turn 1.
    first = {**MESSAGES[0], "content": PLACEHOLDER * n + "\n" + MESSAGES[0]["content"]}
    expected = tok.apply_chat_template([first, *MESSAGES[1:]], tokenize=False)
    assert tok.decode(ids) == expected
    assert int((ids == chat_mllm.placeholder_id).sum()) == n
    # Loss on each answer and what ends it (eos, then the template's newline); nothing else.
    assert labelled_spans(tok, ids, labels) == ["seven</s>\n", "left up</s>\n"]


def test_chat_template_generation_prompt(chat_mllm):
    tok = chat_mllm.tokenizer
    gen = Collator(chat_mllm, train=False)([image_sample(), image_sample(MESSAGES[:2], "s1")])
    assert "labels" not in gen
    rows = [tok.decode(r[m.bool()]) for r, m in zip(gen["input_ids"], gen["attention_mask"])]
    # Every turn but the final answer, ending where the answer starts.
    assert rows[0].endswith(
        "seven</s>\n<|user|>\nwhich way does the digit move ?<|end|>\n<|assistant|>\n")
    assert rows[1].endswith("what digit is shown ?<|end|>\n<|assistant|>\n")
    assert "seven" not in rows[1]
    # A prompt ending with a user turn (mera predict) is taken as it is.
    same = Collator(chat_mllm, train=False)([image_sample(MESSAGES[:1], "s2")])
    assert tok.decode(same["input_ids"][0][same["attention_mask"][0].bool()]) == rows[1]


def test_too_long_loses_last_turns_then_first_text(chat_mllm):
    tok, n = chat_mllm.tokenizer, chat_mllm.encoders["image"].num_tokens
    whole = Collator(chat_mllm, train=True).encode(image_sample())[0]
    one_turn = Collator(chat_mllm, train=True).encode(image_sample(MESSAGES[:2]))[0]
    chat_mllm.max_length = len(whole) - 1  # the second turn no longer fits
    try:
        ids, labels = Collator(chat_mllm, train=True).encode(image_sample())
        assert ids == one_turn
        chat_mllm.max_length = len(one_turn) - 2  # the first user text loses its end
        ids, labels = Collator(chat_mllm, train=True).encode(image_sample())
        assert len(ids) <= chat_mllm.max_length and ids.count(chat_mllm.placeholder_id) == n
        assert tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE]) == "seven</s>\n"
        chat_mllm.max_length = n  # the image block alone fills it
        with pytest.raises(Exception, match=r"s0: 16 image tokens.*max_length=16"):
            Collator(chat_mllm, train=True).encode(image_sample())
    finally:
        chat_mllm.max_length = 96


def test_plain_template_multi_turn():
    mllm = mllm_of({"max_length": 64})
    tok = mllm.tokenizer
    batch = Collator(mllm, train=True)([image_sample()])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    block = " ".join([PLACEHOLDER] * 16)
    assert tok.decode(ids) == (f"<s> user : {block} what digit is shown ? assistant : seven </s> "
                               "user : which way does the digit move ? assistant : left up </s>")
    assert labelled_spans(tok, ids, labels) == ["seven </s>", "left up </s>"]


def test_placeholder_in_text_is_refused(chat_mllm):
    bad = [{"role": "user", "content": f"look {PLACEHOLDER}"}, MESSAGES[1]]
    with pytest.raises(Exception, match=f"s0: a message contains {PLACEHOLDER}"):
        Collator(chat_mllm, train=True)([image_sample(bad)])


def test_text_ids_are_the_tokenizers(chat_mllm):
    """text_ids calls a fast tokenizer's backend directly, with the settings a call through
    transformers would use, whatever an earlier call left set on it."""
    texts = ["", " ", "user :", " what digit is shown in the image ?", "  two  spaces", "UPPER ?",
             f"{PLACEHOLDER}{PLACEHOLDER}\nhi", "</s> inside", "é ü 😀", "<|user|>\nq<|end|>\n"]
    for tok in (tiny_tokenizer(), chat_mllm.tokenizer):
        encode = text_ids(tok)
        assert encode(texts) == [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        tok(texts, truncation=True, max_length=2, padding="max_length")  # left set on it
        assert encode(texts) == tok(texts, add_special_tokens=False)["input_ids"]
        tok.split_special_tokens = True
        try:
            assert encode(texts) == tok(texts, add_special_tokens=False)["input_ids"]
        finally:
            tok.split_special_tokens = False


def _raw(meta):
    buf = io.BytesIO()
    from PIL import Image
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, format="PNG")
    return {"__key__": "k1", "__url__": "shard.tar", "json": json.dumps(meta).encode(),
            "png": buf.getvalue()}


def test_decode_messages_and_one_turn():
    s = decode_sample(_raw({"modality": "image", "messages": MESSAGES, "id": "x"}))
    assert s["messages"] == MESSAGES
    assert (s["instruction"], s["answer"]) == ("what digit is shown ?", "left up")
    s = decode_sample(_raw({"modality": "image", "instruction": "q ?", "answer": "a"}))
    assert s["messages"] == [{"role": "user", "content": "q ?"},
                             {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize("messages, problem", [
    (MESSAGES[:3], "'messages' is not a list of user and assistant turns"),
    ([MESSAGES[1], MESSAGES[0]], r"'messages\[0\]' is not \{\"role\": \"user\""),
    ([MESSAGES[0], {"role": "assistant", "content": 7}], r"'messages\[1\]'"),
    ("hello", "'messages' is not a list"),
])
def test_decode_bad_messages_named(messages, problem):
    with pytest.raises(CorruptDataError, match=f"shard.tar: sample 'k1': json {problem}"):
        decode_sample(_raw({"modality": "image", "messages": messages}))
    with pytest.raises(CorruptDataError, match="json has no 'messages' and no string 'answer'"):
        decode_sample(_raw({"modality": "image", "instruction": "q"}))


def test_chat_llm_trains_on_answers(chat_mllm):
    """One step of the HF Llama on a conversation: the loss is finite and reaches the LLM."""
    batch = Collator(chat_mllm, train=True)([image_sample()])
    loss = chat_mllm(batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert chat_mllm.llm.get_input_embeddings().weight.grad.abs().sum() > 0
    chat_mllm.zero_grad()
