"""Small random-init HF models saved as local directories, as a user's pretrained components would
be (nothing is downloaded): a Llama with a byte-level BPE tokenizer and a chat template, a CLIP
and a SigLIP vision tower, a Whisper encoder, each with its processor config."""
from __future__ import annotations

import os

import torch

from mera_ds.model.tiny import TASK_WORDS

# A chat template in the style of instruct models: role markers, an end-of-turn token after the
# user, eos after the assistant (what generation stops on).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "<|user|>\n{{ m['content'] }}<|end|>\n"
    "{% else %}<|assistant|>\n{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CORPUS = [" ".join(TASK_WORDS), "the quick brown fox jumps over the lazy dog",
          "a red square, a blue circle and a green triangle on a white background",
          "what is shown ? describe the picture . which note is played ? how many ?"]


def chat_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", chat_template=CHAT_TEMPLATE,
                                   additional_special_tokens=specials[3:],
                                   clean_up_tokenization_spaces=False)


def save_llama(path: str, seed: int = 0) -> str:
    """A 2-layer Llama (hidden 64) and its chat tokenizer at `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = chat_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _save_vision(path: str, family: str, processor, seed: int, image_size: int,
                 patch_size: int) -> str:
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, f"{family}VisionConfig")(
        image_size=image_size, patch_size=patch_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2)
    getattr(transformers, f"{family}VisionModel")(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_clip(path: str, image_size: int = 28, patch_size: int = 7) -> str:
    from transformers import CLIPImageProcessor

    return _save_vision(path, "CLIP", CLIPImageProcessor(size={"shortest_edge": image_size},
                                                         crop_size=image_size),
                        1, image_size, patch_size)


def save_siglip(path: str, image_size: int = 28, patch_size: int = 7) -> str:
    from transformers import SiglipImageProcessor

    return _save_vision(path, "Siglip",
                        SiglipImageProcessor(size={"height": image_size, "width": image_size}),
                        2, image_size, patch_size)


def save_whisper(path: str) -> str:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    torch.manual_seed(3)
    WhisperForConditionalGeneration(WhisperConfig(
        num_mel_bins=40, max_source_positions=50, d_model=32, encoder_layers=1,
        encoder_attention_heads=2, encoder_ffn_dim=64, decoder_layers=1,
        decoder_attention_heads=2, decoder_ffn_dim=64, vocab_size=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)).save_pretrained(path)
    WhisperFeatureExtractor(feature_size=40, chunk_length=1).save_pretrained(path)
    return path


def save_all(root: str) -> dict[str, str]:
    """{"llm", "clip", "siglip", "whisper"}: each saved under `root`."""
    return {name: make(os.path.join(root, name)) for name, make in
            (("llm", save_llama), ("clip", save_clip), ("siglip", save_siglip),
             ("whisper", save_whisper))}
