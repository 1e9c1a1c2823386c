"""The MLLM on CPU with the built-in tiny models: encoders, connectors, LLM directories, the
collator's prompts and labels, which parameters train in each stage, and that it learns."""
import functools
import os

import numpy as np
import pytest
import torch

from mera_ds.config import EncoderConfig, LLMConfig, parse_config
from mera_ds.errors import MeraError
from mera_ds.model import (PLACEHOLDER, Collator, build_connector, build_encoder, build_llm,
                           build_mllm, build_tokenizer, load_connector, param_groups,
                           save_connector, save_llm_metadata, set_trainable, tiny_tokenizer)
from mera_ds.model.llm import attn_implementation

# ---- synthetic decoded samples in the formats of COMMON.md (no mera_ds.data import) ----------

INSTRUCTION = {
    "image": "what digit is shown in the image ?",
    "video": "which way does the digit move in the video ?",
    "audio": "which note is played in the audio ?",
    "depth": "what shape is in the depth map ?",
    "feat": "what digit is shown in the image ?",
}
ANSWERS = {
    "image": "zero one two three four five six seven eight nine".split(),
    "video": "left right up down".split(),
    "audio": "do re mi fa sol la ti".split(),
    "depth": "sphere cube cylinder cone".split(),
    "feat": "zero one".split(),
}
KIND = {"image": "image", "video": "video", "audio": "audio", "depth": "depth", "feat": "features"}
NOTES_HZ = [261.63, 293.66, 329.63, 349.23, 392.00, 440.00, 493.88]  # C4..B4


@functools.lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits  # bundled with scikit-learn, nothing downloaded

    return load_digits()


def _digit(rng, label, size):
    digits = _digits()
    imgs = digits.images[digits.target == label]
    return np.kron(imgs[rng.integers(len(imgs))] / 16.0, np.ones((size // 8, size // 8)))


def _image(rng, label):
    canvas = np.zeros((32, 32))
    size = int(rng.choice([24, 32]))
    y, x = rng.integers(0, 33 - size, 2)
    canvas[y:y + size, x:x + size] = _digit(rng, label, size)
    canvas += rng.normal(0, 0.05, canvas.shape)
    return (np.clip(canvas, 0, 1) * 255).astype(np.uint8)


def _video(rng, label, frames=4):
    digit = _digit(rng, int(rng.integers(10)), 16)
    dy, dx = [(0, -1), (0, 1), (-1, 0), (1, 0)][label]  # left right up down
    y0, x0 = 8 - 6 * dy + rng.integers(-2, 3), 8 - 6 * dx + rng.integers(-2, 3)
    out = np.zeros((frames, 32, 32))
    for t in range(frames):
        y, x = int(np.clip(y0 + 5 * dy * t, 0, 16)), int(np.clip(x0 + 5 * dx * t, 0, 16))
        out[t, y:y + 16, x:x + 16] = digit
    return (out * 255).astype(np.uint8)


def _audio(rng, label, sr=16000):
    t = np.arange(sr) / sr
    wave = rng.uniform(0.2, 0.9) * np.sin(2 * np.pi * NOTES_HZ[label] * t + rng.uniform(0, 6))
    return np.clip(wave + rng.normal(0, 0.01, sr), -1, 1).astype(np.float32)


def _depth(rng, label):
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float64)
    r = rng.uniform(5, 11)
    cy, cx = rng.uniform(r, 32 - r, 2)
    dist, bump = rng.uniform(2, 8), r / 8
    u, v = (xx - cx) / r, (yy - cy) / r
    d = np.full((32, 32), 20.0)
    if label == 0:  # sphere
        m = u ** 2 + v ** 2 < 1
        d[m] = dist - bump * np.sqrt(1 - u[m] ** 2 - v[m] ** 2)
    elif label == 1:  # cube, face on
        m = (abs(u) < 0.8) & (abs(v) < 0.8)
        d[m] = dist
    else:  # cylinder (constant width) or cone (widening downwards), upright
        half = np.full_like(v, 0.7) if label == 2 else np.maximum(0.8 * (v + 1) / 2, 1e-3)
        m = (abs(u) < half) & (abs(v) < 1)
        d[m] = dist - bump * np.sqrt(np.clip(1 - (u[m] / half[m]) ** 2, 0, 1))
    return d.astype(np.float32)


def _features(rng, label):
    x = rng.normal(0, 1, (int(rng.integers(3, 9)), 16))
    x[:, label] += 3
    return x.astype(np.float32)


MAKE = {"image": _image, "video": _video, "audio": _audio, "depth": _depth, "feat": _features}


def sample(modality, rng, label=None, i=0, split="train"):
    label = int(rng.integers(len(ANSWERS[modality]))) if label is None else label
    s = {"__key__": f"{modality}-{split}-{i:06d}", "__url__": "memory://", "modality": modality,
         "instruction": INSTRUCTION[modality], "answer": ANSWERS[modality][label],
         "input_kind": KIND[modality], "input": MAKE[modality](rng, label), "label": label}
    if modality == "audio":
        s["sample_rate"] = 16000
    return s


ENCODER = {"image": {"type": "clip_vision"}, "video": {"type": "video"},
           "audio": {"type": "whisper"}, "depth": {"type": "depth"},
           "feat": {"type": "precomputed", "feature_dim": 16}}
MODALITIES = list(ENCODER)


def run_config(modalities=MODALITIES, **llm):
    return parse_config({
        "run_dir": "/tmp/unused",
        "llm": llm,
        "modalities": [{"name": m, "encoder": ENCODER[m], "train_shards": "x", "eval_shards": "y"}
                       for m in modalities],
        "cluster": {"num_workers": 1},
    })


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one intra-op thread is several times faster than two fighting over a busy
    2-core machine (~30 ms vs 150-900 ms per forward+backward of 16 samples)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def params_of(mllm, part):
    """(name, param) of one part: "llm", "encoders.<m>" or "connectors.<m>"."""
    if part.startswith("encoders."):  # frozen encoders live outside the module tree
        return list(mllm.encoders[part.split(".", 1)[1]].named_parameters())
    return [(n, p) for n, p in mllm.named_parameters() if n.startswith(part + ".")]


# ---- tokenizer and LLM directories -------------------------------------------------------------

def test_tiny_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = tiny_tokenizer()
    for m in MODALITIES:
        for answer in ANSWERS[m]:
            text = f"user : {INSTRUCTION[m]} assistant : {answer}"
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == text
    ids = tok(f"user : {PLACEHOLDER}{PLACEHOLDER} {INSTRUCTION['image']}")["input_ids"]
    ph = tok.convert_tokens_to_ids(PLACEHOLDER)
    assert ids[0] == tok.bos_token_id and ids.count(ph) == 2  # one token each, never split
    assert tok("Hi 42 ?!", add_special_tokens=False)["input_ids"] == \
        tok("hi 4 2 ? !", add_special_tokens=False)["input_ids"]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = f"user : {PLACEHOLDER} {INSTRUCTION['audio']} assistant : sol"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 1, 2)
    assert again.convert_tokens_to_ids(PLACEHOLDER) == ph


def test_llm_dir_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm, tok = build_llm(LLMConfig(max_length=64))
    assert attn_implementation(LLMConfig()) == "sdpa"  # no GPU here
    meta = tmp_path / "meta"
    save_llm_metadata(llm, tok, str(meta))
    assert {"config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(os.listdir(meta))
    full = tmp_path / "llm"
    save_llm_metadata(llm, tok, str(full))
    llm.save_pretrained(full)  # the streaming writer's job in a run; here HF's own
    loaded = AutoModelForCausalLM.from_pretrained(full)
    assert AutoTokenizer.from_pretrained(full)("user : mi")["input_ids"] == \
        tok("user : mi")["input_ids"]
    ours = llm.state_dict()
    assert set(loaded.state_dict()) == set(ours)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ours[k]), k
    # build_llm on the directory: same weights, no resize (the token is already there)
    again, tok2 = build_llm(LLMConfig(), path=str(full))
    assert again.get_input_embeddings().num_embeddings == len(tok2) == len(tok)
    assert torch.equal(again.lm_head.weight, llm.lm_head.weight)
    assert build_tokenizer(LLMConfig(), path=str(full)).get_vocab() == tok.get_vocab()


def test_hf_llm_gets_placeholder_token(tmp_path):
    """An HF LLM whose tokenizer lacks <modality>: the token is added, embeddings grow."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "user", ":", "hi"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=6, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    llm, tok2 = build_llm(LLMConfig(path=str(tmp_path)))
    assert tok2.convert_tokens_to_ids(PLACEHOLDER) == 6 and tok2.pad_token == "</s>"
    assert llm.get_input_embeddings().num_embeddings == 7
    assert torch.equal(llm.get_input_embeddings().weight[:6], model.get_input_embeddings().weight)
    with pytest.raises(MeraError, match="nowhere"):
        build_llm(LLMConfig(path=str(tmp_path / "nowhere")))


# ---- encoders ----------------------------------------------------------------------------------

@pytest.mark.parametrize("modality", MODALITIES)
def test_encoder_frozen_deterministic_fixed_shape(modality):
    cfg = EncoderConfig(**ENCODER[modality])
    enc, twin = build_encoder(modality, cfg), build_encoder(modality, cfg)
    for (k, a), (_, b) in zip(enc.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), k  # same weights in every process, never saved
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and all(not m.training for m in enc.modules())
    rng = np.random.default_rng(1)
    samples = [sample(modality, rng, i=i) for i in range(3)]
    # inputs of other sizes / layouts still give the same fixed shape
    if modality in ("image", "depth"):
        samples[1]["input"] = np.resize(samples[1]["input"], (48, 40))
    if modality == "image":
        samples[2]["input"] = np.stack([samples[2]["input"]] * 3, axis=-1)
    if modality == "video":
        samples[1]["input"] = np.concatenate([samples[1]["input"]] * 2)  # 8 frames
        samples[2]["input"] = np.stack([samples[2]["input"]] * 3, axis=-1)  # RGB
    if modality == "audio":
        samples[1]["input"] = samples[1]["input"][::2].copy()
        samples[1]["sample_rate"] = 8000
        samples[2]["input"] = samples[2]["input"][:5000]
    xs = [enc.preprocess(s) for s in samples]
    assert len({tuple(x.shape) for x in xs}) == 1
    out = enc(torch.stack(xs))
    assert out.shape == (3, enc.num_tokens, enc.out_dim) and out.grad_fn is None
    assert torch.isfinite(out).all()
    if modality != "feat":  # different modalities get different random towers
        other = build_encoder(modality + "_b", cfg)
        assert not torch.equal(next(other.parameters()), next(enc.parameters()))


def test_encoder_input_errors():
    enc = build_encoder("image", EncoderConfig(type="clip_vision"))
    rng = np.random.default_rng(0)
    bad = sample("audio", rng)
    with pytest.raises(MeraError, match="audio-train-000000.*input_kind 'image'"):
        enc.preprocess(bad)
    feats = build_encoder("feat", EncoderConfig(type="precomputed", feature_dim=16))
    with pytest.raises(MeraError, match=r"expected \(N, 16\)"):
        feats.preprocess({**sample("feat", rng), "input": np.zeros((4, 8), np.float32)})
    with pytest.raises(MeraError, match="tiny: unknown field.*hiden_size"):
        build_encoder("image", EncoderConfig(type="clip_vision", tiny={"hiden_size": 8}))
    with pytest.raises(ValueError, match="spatial_grid"):
        build_encoder("video", EncoderConfig(type="video", spatial_grid=0))


def test_tiny_encoders_keep_the_task_signal():
    """Random frozen towers are random projections: a linear probe on their features must do
    about as well as one on the raw (preprocessed) input, on every built-in task."""
    from sklearn.linear_model import RidgeClassifier

    rng = np.random.default_rng(0)
    for modality in ("image", "video", "audio", "depth"):
        enc = build_encoder(modality, EncoderConfig(**ENCODER[modality]))
        samples = [sample(modality, rng, i=i) for i in range(300)]
        x = torch.stack([enc.preprocess(s) for s in samples])
        y = np.array([s["label"] for s in samples])
        acc = {}
        for name, feats in (("raw", x.flatten(1)), ("encoder", enc(x).flatten(1))):
            probe = RidgeClassifier(alpha=10.0).fit(feats[:200].numpy(), y[:200])
            acc[name] = probe.score(feats[200:].numpy(), y[200:])
        chance = 1 / len(ANSWERS[modality])
        assert acc["encoder"] > chance + 0.1 and acc["encoder"] >= acc["raw"] - 0.1, \
            (modality, acc)


def test_video_tokens_carry_a_motion_stream():
    """Each video token is [appearance, motion]: the motion half is zero for a still clip and on
    its own tells the direction, token by token (the connector maps one token at a time)."""
    from sklearn.linear_model import RidgeClassifier

    rng = np.random.default_rng(0)
    enc = build_encoder("video", EncoderConfig(**ENCODER["video"]))
    samples = [sample("video", rng, i=i) for i in range(300)]
    tokens = enc(torch.stack([enc.preprocess(s) for s in samples]))
    half = enc.out_dim // 2
    still = {**samples[0], "input": np.repeat(samples[0]["input"][:1], 4, axis=0)}
    still_tokens = enc(enc.preprocess(still)[None])[0]
    assert still_tokens[:, half:].abs().max() == 0 and still_tokens[:, :half].abs().max() > 0
    y = np.array([s["label"] for s in samples])
    for t in range(enc.num_tokens):
        motion = tokens[:, t, half:].numpy()
        probe = RidgeClassifier(alpha=10.0).fit(motion[:200], y[:200])
        assert probe.score(motion[200:], y[200:]) > 0.85, t  # chance: 0.25


def test_pretrained_encoders_from_path(tmp_path):
    """`path` set: the tower comes from an HF directory (a whole CLIP / Whisper checkpoint) and
    the pixel / log-mel settings from its processor config."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, WhisperConfig,
                              WhisperFeatureExtractor, WhisperForConditionalGeneration)

    clip = CLIPModel(CLIPConfig(
        vision_config=dict(image_size=28, patch_size=7, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=64, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1)))
    clip.save_pretrained(tmp_path / "clip")
    proc = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size=28)
    proc.save_pretrained(tmp_path / "clip")
    enc = build_encoder("image", EncoderConfig(type="clip_vision", path=str(tmp_path / "clip")))
    assert (enc.num_tokens, enc.out_dim) == (16, 32)
    assert torch.equal(enc.tower.model.embeddings.patch_embedding.weight,
                       clip.vision_model.embeddings.patch_embedding.weight)
    img = sample("image", np.random.default_rng(0))
    ours = enc.preprocess(img)
    theirs = torch.as_tensor(np.asarray(proc(images=np.stack([img["input"]] * 3, -1),
                                             return_tensors="np")["pixel_values"][0]))
    assert ours.shape == theirs.shape == (3, 28, 28)
    assert (ours - theirs).abs().mean() < 0.05  # torch vs PIL bicubic

    whisper = WhisperForConditionalGeneration(WhisperConfig(
        num_mel_bins=40, max_source_positions=50, d_model=32, encoder_layers=1,
        encoder_attention_heads=2, encoder_ffn_dim=64, decoder_layers=1,
        decoder_attention_heads=2, decoder_ffn_dim=64, vocab_size=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=3))
    whisper.save_pretrained(tmp_path / "whisper")
    fe = WhisperFeatureExtractor(feature_size=40, chunk_length=1)
    fe.save_pretrained(tmp_path / "whisper")
    enc = build_encoder("audio", EncoderConfig(type="whisper", path=str(tmp_path / "whisper"),
                                               num_tokens=2))
    assert (enc.num_tokens, enc.out_dim) == (2, 32)
    assert torch.equal(enc.model.conv1.weight, whisper.model.encoder.conv1.weight)
    wav = sample("audio", np.random.default_rng(0))
    assert torch.equal(enc.log_mel(enc.preprocess(wav)[None])[0], torch.as_tensor(  # the same
        fe(wav["input"], sampling_rate=16000, return_tensors="np")["input_features"][0]))


# ---- connectors --------------------------------------------------------------------------------

def test_connector_save_load(tmp_path, s3_bucket):
    a, b = build_connector("mlp2x_gelu", 16, 32), build_connector("mlp2x_gelu", 16, 32)
    for url in (str(tmp_path / "c" / "image.safetensors"), f"{s3_bucket}/c/image.safetensors"):
        save_connector(a, url)
        load_connector(b, url)
        for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), k
    url = str(tmp_path / "c" / "image.safetensors")
    with pytest.raises(MeraError, match=r"image\.safetensors: tensor '0.weight' has shape"):
        load_connector(build_connector("mlp2x_gelu", 8, 32), url)
    with pytest.raises(MeraError, match=r"image\.safetensors: tensor 'weight' is missing"):
        load_connector(build_connector("linear", 16, 32), url)
    save_connector(build_connector("linear", 16, 32), url)
    with pytest.raises(MeraError, match=r"image\.safetensors: tensor '0.weight' is missing"):
        load_connector(b, url)
    with pytest.raises(MeraError, match="no such connector file"):
        load_connector(b, str(tmp_path / "none.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(MeraError, match="junk.safetensors: not a safetensors file"):
        load_connector(b, str(tmp_path / "junk.safetensors"))


def test_llm_dir_on_s3(tmp_path, s3_bucket):
    """save_llm_metadata writes to s3:// directly; build_llm reads an s3:// directory."""
    import fsspec

    llm, tok = build_llm(LLMConfig())
    url = f"{s3_bucket}/run/llm"
    save_llm_metadata(llm, tok, url)
    llm.save_pretrained(tmp_path)
    fs = fsspec.filesystem("s3")
    fs.put_file(str(tmp_path / "model.safetensors"), f"{url}/model.safetensors")
    assert {"config.json", "tokenizer.json"} <= {p.rsplit("/", 1)[1] for p in fs.ls(url)}
    again, _ = build_llm(LLMConfig(), path=url)
    assert torch.equal(again.model.embed_tokens.weight, llm.model.embed_tokens.weight)


# ---- the collator: prompts, labels, padding, truncation ----------------------------------------

@pytest.fixture(scope="module")
def mllm():
    return build_mllm(run_config(max_length=64))


def test_collator_prompt_labels_padding(mllm):
    rng = np.random.default_rng(0)
    samples = [sample(m, rng, i=i) for i, m in enumerate(MODALITIES)]
    tok, ph = mllm.tokenizer, mllm.placeholder_id
    batch = Collator(mllm, train=True)(samples)
    for row, s in enumerate(samples):
        ids, mask = batch["input_ids"][row], batch["attention_mask"][row]
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding
        text = tok.decode(ids[:n])
        block = " ".join([PLACEHOLDER] * mllm.encoders[s["modality"]].num_tokens)
        assert text == f"<s> user : {block} {s['instruction']} assistant : {s['answer']} </s>"
        assert int((ids == ph).sum()) == mllm.encoders[s["modality"]].num_tokens
        labels = batch["labels"][row]
        labelled = (labels != -100).nonzero().flatten().tolist()
        assert labelled == [n - 2, n - 1]  # the one-word answer and eos, nothing else
        assert tok.decode(labels[labelled]) == f"{s['answer']} </s>"
    assert set(batch["inputs"]) == set(MODALITIES)
    assert batch["num_tokens"] == int(batch["attention_mask"].sum())
    gen = Collator(mllm, train=False)(samples)
    assert "labels" not in gen
    for row, s in enumerate(samples):
        mask = gen["attention_mask"][row]
        n = int(mask.sum())
        assert mask[-n:].all() and not mask[:-n].any()  # left padding, prompt only
        assert tok.decode(gen["input_ids"][row, -n:]).endswith(f"{s['instruction']} assistant :")


def test_collator_truncation():
    samples = [sample("image", np.random.default_rng(0))]
    short = build_mllm(run_config(["image"], max_length=26))  # 16 image tokens
    batch = Collator(short, train=True)(samples)
    ids = batch["input_ids"][0]
    assert len(ids) == 26 and int((ids == short.placeholder_id).sum()) == 16
    # the instruction lost its end; the template and the answer are whole
    answer = samples[0]["answer"]
    assert short.tokenizer.decode(ids[19:]) == f"what digit is assistant : {answer} </s>"
    assert short.tokenizer.decode(Collator(short, train=False)(samples)["input_ids"][0][-2:]) == \
        "assistant :"
    tiny = build_mllm(run_config(["image"], max_length=20))
    with pytest.raises(MeraError, match="image-train-000000: 16 image tokens.*max_length=20"):
        Collator(tiny, train=True)(samples)
    with pytest.raises(MeraError, match="modality 'audio' has no encoder"):
        Collator(short, train=True)([sample("audio", np.random.default_rng(0))])


def reference_batch(mllm, samples, train, pack):
    """What the Collator gives, made the plain way: each text tokenized by calling the
    tokenizer, each input preprocessed alone (audio: by the WhisperFeatureExtractor), the batch
    tensors filled in sample by sample."""
    ref = Collator(mllm, train=train, pack=pack)
    tok = mllm.tokenizer
    ref.template.encode = lambda texts: [tok(t, add_special_tokens=False)["input_ids"]
                                         for t in texts]
    encoded = [ref.encode(s) for s in samples]
    rows = ref._pack(encoded) if pack else [[i] for i in range(len(samples))]
    width = max(sum(len(encoded[i][0]) for i in row) for row in rows)
    batch = {"input_ids": torch.full((len(rows), width), tok.pad_token_id),
             "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
             "labels": torch.full((len(rows), width), -100),
             "position_ids": torch.zeros((len(rows), width), dtype=torch.long)}
    inputs, order = {}, [i for row in rows for i in row]
    for r, row in enumerate(rows):
        start = 0 if train else width - sum(len(encoded[i][0]) for i in row)
        for i in row:
            ids, labels = encoded[i]
            span = slice(start, start + len(ids))
            batch["input_ids"][r, span] = torch.tensor(ids)
            batch["attention_mask"][r, span] = 1
            batch["labels"][r, span] = torch.tensor(labels)
            batch["position_ids"][r, span] = torch.arange(len(ids))
            start += len(ids)
    for i in order:
        s, enc = samples[i], mllm.encoders[samples[i]["modality"]]
        x = enc.preprocess(s) if s["modality"] != "audio" else torch.from_numpy(enc.features(
            enc._wave(s), sampling_rate=16000, return_tensors="np")["input_features"][0])
        inputs.setdefault(s["modality"], []).append(x)
    batch["inputs"] = {m: torch.stack(xs) for m, xs in inputs.items()}
    for key, field in (("modalities", "modality"), ("answers", "answer"), ("keys", "__key__")):
        batch[key] = [samples[i][field] for i in order]
    batch["num_tokens"] = int(batch["attention_mask"].sum())
    if not train:
        del batch["labels"]
    del batch["attention_mask" if pack else "position_ids"]
    return batch


@pytest.mark.parametrize("llm", ["tiny", "chat template"])
def test_collator_matches_the_plain_way(llm, tmp_path):
    """The Collator's batches are, bit for bit, the reference's, on every modality, with inputs
    of other shapes, rates and channels, several turns, truncation, packing and generation."""
    from tests.hf_models import save_llama

    # max_length: the 4-turn sample loses its last 2 turns in training, the long one its end
    llm = {"path": save_llama(str(tmp_path / "llm")), "max_length": 86} \
        if llm == "chat template" else {"max_length": 60}
    mllm = build_mllm(run_config(["image", "video", "audio", "depth"], **llm))
    rng = np.random.default_rng(5)
    plain = [sample(m, rng, i=i) for i, m in enumerate(["image", "video", "audio", "depth"] * 2)]
    odd = [sample(m, rng, i=10 + i) for i, m in enumerate(["image"] * 2 + ["audio"] * 3)]
    odd[0]["input"] = np.resize(odd[0]["input"], (48, 40))  # resized, then cropped
    odd[1]["input"] = np.stack([odd[1]["input"]] * 3, axis=-1)  # RGB
    odd[2].update(input=odd[2]["input"][::2].copy(), sample_rate=8000)  # resampled
    odd[3]["input"] = np.stack([odd[3]["input"][:5000]] * 2, axis=-1)  # short, stereo
    odd[4]["input"] = np.concatenate([odd[4]["input"]] * 2)  # longer than the window: cut
    turns = [{"role": "user", "content": "what digit is shown in the image ?"},
             {"role": "assistant", "content": "seven"},
             {"role": "user", "content": "which way does it move ? " * 4},
             {"role": "assistant", "content": "left up"}]
    odd.append({**sample("image", rng, i=20), "messages": turns})  # its last turns cut
    odd.append({**sample("depth", rng, i=21), "instruction": "what shape is shown ? " * 9})
    images = [sample("image", rng, i=30 + i) for i in range(8)]  # one pixel batch
    for samples in (plain, odd, images):
        for train, pack in ((True, False), (True, True), (False, False)):
            batch = Collator(mllm, train=train, pack=pack)(samples)
            expected = reference_batch(mllm, samples, train, pack)
            assert set(batch) == set(expected)
            assert list(batch["inputs"]) == list(expected["inputs"])
            for key, value in [*batch.items(), *batch["inputs"].items()]:
                want = expected[key] if key in expected else expected["inputs"][key]
                if key == "audio":  # clips; the encoder's forward makes their features
                    value = mllm.encoders["audio"].log_mel(value)
                if torch.is_tensor(value):
                    assert value.dtype == want.dtype and torch.equal(value, want), (key, pack)
                elif key != "inputs":
                    assert value == want, (key, pack)


# ---- forward/backward: what trains in each phase -----------------------------------------------

PHASES = {  # phase -> (train the LLM?, connectors to train given the batch's modality)
    "finetune": (True, lambda m: [m]),
    "align": (False, lambda m: [m]),
    "realign": (False, lambda m: MODALITIES),
}


def check_step(mllm, batch, llm_trains, trained_connectors):
    before = snapshot(mllm)
    groups = param_groups(mllm, lr_llm=1e-2, lr_connector=1e-2)
    assert [g["name"] for g in groups] == (["llm"] if llm_trains else []) + ["connectors"]
    opt = torch.optim.SGD(groups)
    out = mllm(batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for m in MODALITIES:
        assert all(p.grad is None for _, p in params_of(mllm, f"encoders.{m}"))
        for name, p in params_of(mllm, f"connectors.{m}"):
            if m in trained_connectors:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
            else:
                assert p.grad is None, name
    llm_grads = [p.grad for _, p in params_of(mllm, "llm")]
    assert all(g is not None for g in llm_grads) if llm_trains else \
        all(g is None for g in llm_grads)
    opt.step()
    after = mllm.state_dict()
    for k, v in before.items():
        trains = (k.startswith("llm.") and llm_trains) or any(
            k.startswith(f"connectors.{m}.") for m in trained_connectors)
        if not trains:
            assert torch.equal(after[k], v), f"{k} changed"
    if llm_trains:
        assert not torch.equal(after["llm.lm_head.weight"], before["llm.lm_head.weight"])


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("phase", ["finetune", "align"])
def test_forward_backward(phase, modality):
    mllm = build_mllm(run_config())
    llm_trains, connectors = PHASES[phase]
    set_trainable(mllm, llm=llm_trains, connectors=connectors(modality))
    rng = np.random.default_rng(0)
    batch = Collator(mllm, train=True)([sample(modality, rng, i=i) for i in range(3)])
    check_step(mllm, batch, llm_trains, connectors(modality))


def test_realign_mixed_batch():
    """Realign: every connector trains on a replay mix of all modalities in one batch; the LLM
    and the encoders do not."""
    mllm = build_mllm(run_config())
    set_trainable(mllm, llm=False, connectors=MODALITIES)
    rng = np.random.default_rng(0)
    order = ["audio", "image", "feat", "audio", "depth", "video", "image"]
    batch = Collator(mllm, train=True)([sample(m, rng, i=i) for i, m in enumerate(order)])
    check_step(mllm, batch, False, MODALITIES)
    with pytest.raises(MeraError, match="no connector for modality 'point'"):
        set_trainable(mllm, llm=False, connectors=["point"])


def test_splice_and_loss(mllm):
    """Each row's placeholder embeddings are its own connector output; the loss is the mean
    cross-entropy over the answer tokens and eos only."""
    rng = np.random.default_rng(0)
    order = ["video", "image", "audio", "video", "feat"]
    samples = [sample(m, rng, i=i) for i, m in enumerate(order)]
    batch = Collator(mllm, train=True)(samples)
    embeds = mllm.embed(batch)
    for row, s in enumerate(samples):
        m = s["modality"]
        x = mllm.encoders[m].preprocess(s)[None]
        want = mllm.connectors[m](mllm.encoders[m](x))[0]
        got = embeds[row][batch["input_ids"][row] == mllm.placeholder_id]
        assert torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():
        out = mllm(batch)
        logits = out.logits[:, :-1].flatten(0, 1)
        labels = batch["labels"][:, 1:].flatten()
        keep = labels != -100
        manual = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert keep.sum() == 2 * len(samples)
    assert torch.allclose(out.loss, manual, atol=1e-5)


def test_generate_returns_strings(mllm):
    rng = np.random.default_rng(0)
    samples = [sample(m, rng, i=i) for i, m in enumerate(MODALITIES)]
    collate = Collator(mllm, train=False)
    answers = mllm.generate(collate(samples), max_new_tokens=3)
    assert len(answers) == len(samples) and all(isinstance(a, str) for a in answers)
    # left padding does not change a row's answer
    assert answers == [mllm.generate(collate([s]), max_new_tokens=3)[0] for s in samples]


# ---- it learns ---------------------------------------------------------------------------------

def test_learns_a_two_class_image_task():
    """Finetune (LLM + connector) with plain AdamW: stripes across -> "zero", stripes down ->
    "one". Guessing the answer from the prompt alone costs ln 2 / 2 ~ 0.35 per labelled token."""
    mllm = build_mllm(run_config(["image"]))
    set_trainable(mllm, llm=True, connectors=["image"])
    opt = torch.optim.AdamW(param_groups(mllm, lr_llm=1e-3, lr_connector=1e-3))
    rng = np.random.default_rng(0)

    def striped(i, split):
        label = int(rng.integers(2))
        x = rng.uniform(0, 0.3, (32, 32))
        if label == 0:
            x[:, ::4] += 0.7
        else:
            x[::4, :] += 0.7
        return {"__key__": f"image-{split}-{i}", "modality": "image", "input_kind": "image",
                "instruction": INSTRUCTION["image"], "answer": ANSWERS["image"][label],
                "input": (np.clip(x, 0, 1) * 255).astype(np.uint8)}

    collate = Collator(mllm, train=True)
    mllm.train()
    losses = []
    for step in range(60):
        loss = mllm(collate([striped(step * 16 + i, "train") for i in range(16)])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    mllm.eval()
    assert np.mean(losses[:5]) > 2.0 and np.mean(losses[-10:]) < 0.15, losses
    held_out = [striped(i, "eval") for i in range(32)]
    answers = mllm.generate(Collator(mllm, train=False)(held_out), max_new_tokens=2)
    accuracy = np.mean([a == s["answer"] for a, s in zip(answers, held_out)])
    assert accuracy >= 0.9, answers


def test_packed_batch_gives_the_same_loss_as_padded():
    """Packing is an exact rewrite: per-sample causal attention, same labels, same loss."""
    from mera_ds.model.mllm import Collator

    mllm = build_mllm(run_config())
    rng = np.random.default_rng(3)
    samples = [sample(m, rng) for m in ("image", "audio", "video", "depth", "image", "audio")]
    padded = Collator(mllm, train=True)(samples)
    packed = Collator(mllm, train=True, pack=True)(samples)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    assert packed["num_tokens"] == padded["num_tokens"]
    assert "attention_mask" not in packed
    mllm.eval()
    with torch.no_grad():
        a, b = mllm(padded).loss, mllm(packed).loss
    assert torch.allclose(a, b, atol=1e-5), (a, b)


def test_siglip_tower_from_path(tmp_path):
    """A SigLIP checkpoint under `clip_vision`: no class token to drop, its processor's square
    resize (no crop)."""
    from transformers import SiglipImageProcessor

    from tests.hf_models import save_siglip

    path = save_siglip(str(tmp_path / "siglip"))
    enc = build_encoder("image", EncoderConfig(type="clip_vision", path=path))
    assert (enc.num_tokens, enc.out_dim) == (16, 32)
    img = {**sample("image", np.random.default_rng(0)), "input": np.random.default_rng(1)
           .integers(0, 256, (40, 30, 3), dtype=np.uint8)}  # not square: squashed, not cropped
    ours = enc.preprocess(img)
    theirs = torch.as_tensor(np.asarray(SiglipImageProcessor.from_pretrained(path)(
        images=img["input"], return_tensors="np")["pixel_values"][0]))
    assert ours.shape == theirs.shape == (3, 28, 28)
    assert (ours - theirs).abs().mean() < 0.05  # torch vs PIL bicubic
    feats = enc(ours[None])
    hidden = enc.tower.model(pixel_values=ours[None], output_hidden_states=True).hidden_states[-2]
    assert torch.equal(feats, hidden)  # every patch token, none dropped
    with pytest.raises(MeraError, match="not a vision tower"):
        from tests.hf_models import save_whisper
        build_encoder("image", EncoderConfig(type="clip_vision",
                                             path=save_whisper(str(tmp_path / "w"))))
