"""A new user's whole path, end to end: a folder of media and LLaVA-style JSON -> `mera shards
convert` -> a config on their own HF components (a Llama with a chat template, CLIP, Whisper,
saved locally) finetuned with LoRA -> `mera run` on Ray -> `mera export` -> `mera predict`."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from .conftest import ENV, ROOT
from .hf_models import save_clip, save_llama, save_whisper

MODALITIES = ("image", "video", "audio")
TRAIN, EVAL = 32, 8


def make_media(root, modality: str, i: int) -> str:
    """One small file of the modality: a PNG, a 4-frame mp4 (PyAV) or a 0.5 s wav."""
    rng = np.random.default_rng(i)
    os.makedirs(os.path.join(root, modality), exist_ok=True)
    if modality == "image":
        from PIL import Image

        path = f"{modality}/{i}.png"
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
            os.path.join(root, path))
    elif modality == "audio":
        import soundfile

        path = f"{modality}/{i}.wav"
        t = np.arange(8000) / 16000
        soundfile.write(os.path.join(root, path), 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t),
                        16000)
    else:
        import av

        path = f"{modality}/{i}.mp4"
        with av.open(os.path.join(root, path), "w") as container:
            stream = container.add_stream("mpeg4", rate=4)
            stream.width = stream.height = 32
            stream.pix_fmt = "yuv420p"
            for _ in range(4):
                frame = av.VideoFrame.from_ndarray(
                    rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
    return path


def llava_json(root, modality: str, split: str, n: int) -> str:
    """LLaVA-style records, every other one a two-turn conversation."""
    tag = f"<{modality}>"
    records = []
    for i in range(n):
        k = i + (1000 if split == "eval" else 0)
        conv = [{"from": "human", "value": f"{tag}\nwhat is shown ?"},
                {"from": "gpt", "value": ["red", "blue"][k % 2]}]
        if i % 2:
            conv += [{"from": "human", "value": "how many ?"}, {"from": "gpt", "value": "two"}]
        records.append({"id": f"{modality}-{k}", modality: make_media(root, modality, k),
                        "conversations": conv})
    path = os.path.join(root, f"{modality}-{split}.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def mera(*args, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "mera_ds", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


@pytest.mark.timeout(1200)
@pytest.mark.slow  # about 3.5 minutes: `make test-slow`, CI's 30 minutes being spent elsewhere
def test_bring_your_own_data_to_an_answer(tmp_path):
    media, shards = str(tmp_path / "media"), tmp_path / "shards"
    patterns = {}
    for modality in MODALITIES:
        for split, n, per_shard in (("train", TRAIN, TRAIN // 2), ("eval", EVAL, EVAL)):
            mera("shards", "convert", "--format", "llava", "--input",
                 llava_json(media, modality, split, n), "--media-root", media,
                 "--modality", modality, "--out", f"{shards}/{modality}/{split}-%06d.tar",
                 "--samples-per-shard", str(per_shard), "--num-frames", "4")
            patterns[modality, split] = f"{shards}/{modality}/{split}-*.tar"

    hf = {"llm": save_llama(str(tmp_path / "llm")), "clip": save_clip(str(tmp_path / "clip")),
          "whisper": save_whisper(str(tmp_path / "whisper"))}
    encoders = {"image": {"type": "clip_vision", "path": hf["clip"]},
                "video": {"type": "video", "path": hf["clip"], "num_frames": 4},
                "audio": {"type": "whisper", "path": hf["whisper"]}}
    train = {"batch_size": 4, "micro_batch_size": 2}
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "llm": {"path": hf["llm"], "max_length": 96},
        "modalities": [{"name": m, "encoder": encoders[m],
                        "train_shards": patterns[m, "train"], "eval_shards": patterns[m, "eval"],
                        "task": {"metric": "token_f1", "max_new_tokens": 4}}
                       for m in MODALITIES],
        "stages": {"finetune": {"lora": {"r": 4, "alpha": 8}, "lr_llm": 1e-3,
                                "lr_connector": 1e-3, "steps": 4, **train},
                   "realign": {"lr": 1e-3, "steps": 2, "replay_ratio": 0.1, **train},
                   "eval": {"batch_size": 8}},
        "cluster": {"num_workers": 2},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = mera("run", str(path))
    assert "BRG after 3 evaluated stages:" in out

    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())["steps"]
    for stage, m in enumerate(MODALITIES, 1):  # each finetune kept its LoRA adapter
        adapter = run / "stages" / f"{stage:02d}-{m}" / "finetune" / "llm" / "adapter"
        assert sorted(os.listdir(adapter)) == ["adapter_config.json",
                                               "adapter_model.safetensors"]
        assert manifest[f"{stage:02d}-{m}/evaluate"]["result"]["samples"] == {
            k: EVAL for k in MODALITIES[:stage]}

    model = tmp_path / "model"
    mera("export", str(run), "--out", str(model))
    final = json.loads((run / "stages" / "03-audio" / "eval" / "metrics.json").read_text())
    for i, m in enumerate(MODALITIES):
        # A file of the user's, never seen: an answer comes back.
        clip = os.path.join(media, make_media(media, m, 5000 + i))
        mera("predict", str(model), "--modality", m, "--input", clip, "--prompt",
             "what is shown ?", "--device", "cpu")
        # The run's first eval sample of the modality (one turn): the exported model answers
        # what the run's final evaluation answered.
        key, prediction, _ = final["examples"][m][0]
        shard = sorted(glob.glob(patterns[m, "eval"]))[0]
        answer = mera("predict", str(model), "--modality", m, "--input", f"{shard}#{key}",
                      "--prompt", "what is shown ?", "--device", "cpu").strip()
        assert answer == prediction, (m, key)
