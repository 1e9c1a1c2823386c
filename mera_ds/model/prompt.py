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

from mera_ds.errors import MeraError
from mera_ds.model.tiny import PLACEHOLDER

Pieces = list[tuple[list[int], bool]]  # (token ids, labelled), in order


def conversation(sample: dict) -> list[dict[str, str]]:
    """The sample's messages; a sample made without them (one turn) has instruction and answer."""
    if "messages" in sample:
        return sample["messages"]
    return [{"role": "user", "content": sample["instruction"]},
            {"role": "assistant", "content": sample["answer"]}]


class PlainTemplate:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # What the tokenizer adds in front of a text (bos for Llama-style tokenizers).
        self.prefix = tokenizer("", add_special_tokens=True)["input_ids"]
        self.user = self.ids("user :")
        self.tail = self.ids(" assistant :")

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def content_ids(self, content: str) -> list[int]:
        """The tokens a user turn's text takes (what truncation cuts)."""
        return self.ids(" " + content)

    def pieces(self, messages: list[dict[str, str]], media: int) -> Pieces:
        out = []
        for i, m in enumerate(messages):
            if m["role"] == "user":
                head = self.prefix + self.user + [self.placeholder_id] * media if i == 0 \
                    else self.user
                out.append((head + self.content_ids(m["content"]) + self.tail, False))
            else:
                out.append((self.ids(" " + m["content"]) + [self.tokenizer.eos_token_id], True))
        return out

    @property
    def placeholder_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(PLACEHOLDER)


class ChatTemplate(PlainTemplate):
    """The tokenizer's chat template. Each turn is rendered after the ones before it, and its
    piece is what it added to the text: a user turn with the generation prompt (so the piece
    ends where the answer starts), an assistant turn with its end-of-turn tokens."""

    def content_ids(self, content: str) -> list[int]:
        return self.ids(content)

    def pieces(self, messages: list[dict[str, str]], media: int) -> Pieces:
        first = messages[0]
        messages = [{**first, "content": PLACEHOLDER * media + "\n" + first["content"]},
                    *messages[1:]]
        out, done = [], ""
        for k, m in enumerate(messages):
            text = self.tokenizer.apply_chat_template(
                messages[:k + 1], tokenize=False, add_generation_prompt=m["role"] == "user")
            if not text.startswith(done):
                raise MeraError("the tokenizer's chat template renders a conversation differently "
                                "once a turn follows (it is not a growing prefix); mera-ds cannot "
                                "tell which tokens are the answers")
            out.append((self.ids(text[len(done):]), m["role"] == "assistant"))
            done = text
        return out


def template_for(tokenizer) -> PlainTemplate:
    return ChatTemplate(tokenizer) if getattr(tokenizer, "chat_template", None) \
        else PlainTemplate(tokenizer)
