"""Prompts: a sample's conversation -> token ids, and which of them the loss is on.

A conversation is the sample's `messages` (docs/DATA.md): user and assistant turns, alternating,
from a user turn; the modality input goes at the start of the first user turn, as a block of
`<modality>` placeholder tokens. It is rendered in pieces, one per turn, each with a flag saying
whether it is labelled (assistant turns: their text and what ends them, eos or the template's
end-of-turn tokens), so that a multi-turn sample trains on every answer and on nothing else.

Two templates: the tokenizer's own chat template (`apply_chat_template`), which an HF instruct
LLM was trained with; or, for a tokenizer without one (the built-in tiny LLM), a plain one:

    [bos] "user :" <modality> x N " {user}" " assistant :" " {assistant}" eos "user :" ...
"""
from __future__ import annotations

import functools
from typing import Callable

from transformers import PreTrainedTokenizerFast

from mera_ds.errors import MeraError
from mera_ds.model.tiny import PLACEHOLDER

Pieces = list[tuple[list[int], bool]]  # (token ids, labelled), in order
TextIds = Callable[[list[str]], list[list[int]]]  # texts -> the token ids of each
TEXT_CACHE = 1 << 16  # texts whose ids text_ids keeps: a few MB


def text_ids(tokenizer) -> TextIds:
    """What `tokenizer(texts, add_special_tokens=False)["input_ids"]` gives, for less. A fast
    tokenizer whose class tokenizes as transformers' own does is called in its Rust backend,
    set up as that call sets it up: its wrapping (argument checks, truncation and padding
    settings, BatchEncoding) costs more than tokenizing a short text."""
    cls = type(tokenizer)
    if not (isinstance(tokenizer, PreTrainedTokenizerFast)
            and cls.__call__ is PreTrainedTokenizerFast.__call__
            and cls._encode_plus is PreTrainedTokenizerFast._encode_plus):
        return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
    backend = tokenizer.backend_tokenizer

    # Instructions, and often answers, repeat across a data set: a text's ids are kept (the
    # lists are shared, never changed by their users) and looked up for a tenth of tokenizing.
    @functools.lru_cache(maxsize=TEXT_CACHE)
    def ids(text: str, split_special_tokens: bool) -> list[int]:
        # Checked on every call, as transformers does: a call elsewhere may have changed them.
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        backend.encode_special_tokens = split_special_tokens
        return backend.encode(text, add_special_tokens=False).ids

    def encode(texts: list[str]) -> list[list[int]]:
        # One text at a time: encode_batch would hand a few short texts to a thread pool, for
        # no gain, on the cores the training step needs.
        split = tokenizer.split_special_tokens
        return [ids(text, split) for text in texts]

    return encode


def conversation(sample: dict) -> list[dict[str, str]]:
    """The sample's messages; a sample made without them (one turn) has instruction and answer."""
    if "messages" in sample:
        return sample["messages"]
    return [{"role": "user", "content": sample["instruction"]},
            {"role": "assistant", "content": sample["answer"]}]


class PlainTemplate:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.encode = text_ids(tokenizer)
        # What the tokenizer adds in front of a text (bos for Llama-style tokenizers).
        self.prefix = tokenizer("", add_special_tokens=True)["input_ids"]
        # The template's own words, tokenized once.
        self.user, self.tail = self.encode(["user :", " assistant :"])
        self.placeholder_id = tokenizer.convert_tokens_to_ids(PLACEHOLDER)
        self.eos_id = tokenizer.eos_token_id

    def content_ids(self, content: str) -> list[int]:
        """The tokens a user turn's text takes (what truncation cuts)."""
        return self.encode([" " + content])[0]

    def pieces(self, messages: list[dict[str, str]], media: int) -> Pieces:
        texts = self.encode([" " + m["content"] for m in messages])
        out = []
        for i, (m, ids) in enumerate(zip(messages, texts)):
            if m["role"] == "user":
                head = self.prefix + self.user + [self.placeholder_id] * media if i == 0 \
                    else self.user
                out.append((head + ids + self.tail, False))
            else:
                out.append((ids + [self.eos_id], True))
        return out


class ChatTemplate(PlainTemplate):
    """The tokenizer's chat template. Each turn is rendered after the ones before it, and its
    piece is what it added to the text: a user turn with the generation prompt (so the piece
    ends where the answer starts), an assistant turn with its end-of-turn tokens."""

    def content_ids(self, content: str) -> list[int]:
        return self.encode([content])[0]

    def pieces(self, messages: list[dict[str, str]], media: int) -> Pieces:
        first = messages[0]
        messages = [{**first, "content": PLACEHOLDER * media + "\n" + first["content"]},
                    *messages[1:]]
        texts, done = [], ""
        for k, m in enumerate(messages):
            text = self.tokenizer.apply_chat_template(
                messages[:k + 1], tokenize=False, add_generation_prompt=m["role"] == "user")
            if not text.startswith(done):
                raise MeraError("the tokenizer's chat template renders a conversation differently "
                                "once a turn follows (it is not a growing prefix); mera-ds cannot "
                                "tell which tokens are the answers")
            texts.append(text[len(done):])
            done = text
        return [(ids, m["role"] == "assistant")
                for ids, m in zip(self.encode(texts), messages)]


def template_for(tokenizer) -> PlainTemplate:
    return ChatTemplate(tokenizer) if getattr(tokenizer, "chat_template", None) \
        else PlainTemplate(tokenizer)
