"""`mera export` and `mera predict` on a run whose artifacts are made without training: the tiny
LLM and connectors written where the plan's final evaluate step reads them, that step run and
recorded through the run's Manifest. The exported model answers as the run's own artifacts do,
from a file or a shard sample per question or a JSONL file of questions, after the run is gone
too, and from S3."""
import json
import os
import shutil

import pytest
import torch

from mera_ds import bundle
from mera_ds.cli import main
from mera_ds.config import parse_config
from mera_ds.data.decode import decode_sample
from mera_ds.data.synth import TASKS
from mera_ds.data.tar import expand_shards, raw_samples
from mera_ds.errors import MeraError
from mera_ds.model.connectors import load_connector, save_connector
from mera_ds.model.llm import build_llm
from mera_ds.model.mllm import Collator, build_mllm
from mera_ds.run.layout import RunLayout
from mera_ds.run.local import run_step
from mera_ds.run.manifest import Manifest
from mera_ds.run.plan import Method, plan

from .conftest import default_config

# The member of a shard sample each modality's input file is, and its file name's extension.
MEMBERS = {"image": "png", "audio": "wav", "depth": "depth.npy"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(builtin_shards, tmp_path_factory):
    """A four-modality run whose final evaluate step is done: {"cfg", "layout", "final" (that
    step), "dir" (the run), "tmp"}."""
    tmp = tmp_path_factory.mktemp("predict")
    data = default_config(builtin_shards, tmp / "run")
    data["stages"]["eval"] = {"batch_size": 4, "max_samples": 4}
    cfg = parse_config(data)
    layout = RunLayout.of(cfg)
    final = plan(cfg, Method.of(cfg), layout)[-1]
    manifest = Manifest.open(layout, cfg, "mera", resume=False)
    llm, tokenizer = build_llm(cfg.llm)
    llm.save_pretrained(final.spec.llm)
    tokenizer.save_pretrained(final.spec.llm)
    mllm = build_mllm(cfg, llm=llm, tokenizer=tokenizer)
    for m, url in final.spec.connectors.items():
        save_connector(mllm.connectors[m], url)
    manifest.run(final.name, final.outputs, run_step, cfg, final)
    return {"cfg": cfg, "layout": layout, "final": final, "dir": layout.run_dir, "tmp": tmp}


@pytest.fixture(scope="module")
def exported(run):
    out = str(run["tmp"] / "model")
    bundle.export(run["dir"], out)
    return out


@pytest.fixture(scope="module")
def questions(run):
    """{modality: (input for predict, the decoded shard sample it is)}: the first eval sample of
    each modality, as a file (image, audio, depth) or as SHARD#KEY (video)."""
    out = {}
    for m in run["cfg"].modalities:
        shard = expand_shards(m.eval_shards)[0]
        raw = next(raw_samples(shard))
        if m.name in MEMBERS:
            ext = MEMBERS[m.name]
            path = run["tmp"] / "inputs" / f"{m.name}.{ext}"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(raw[ext])
            out[m.name] = (str(path), decode_sample(raw))
        else:
            out[m.name] = (f"{shard}#{raw['__key__']}", decode_sample(raw))
    return out


def by_hand(run, samples: dict) -> dict:
    """{modality: answer} of MLLM.generate on the decoded samples with the instruction of their
    task as the prompt, from the run's own artifacts."""
    cfg, spec = run["cfg"], run["final"].spec
    llm, tokenizer = build_llm(cfg.llm, path=spec.llm)
    mllm = build_mllm(cfg, llm=llm, tokenizer=tokenizer)
    for m, url in spec.connectors.items():
        load_connector(mllm.connectors[m], url)
    mllm.eval()
    collate = Collator(mllm, train=False)
    answers = {}
    for m, sample in samples.items():
        prompt = TASKS[m].instruction
        sample = {**sample, "messages": [{"role": "user", "content": prompt}],
                  "instruction": prompt, "answer": ""}
        with torch.inference_mode():
            answers[m] = mllm.generate(collate([sample]),
                                       max_new_tokens=cfg.modality(m).task.max_new_tokens)[0]
    return answers


def predict(capsys, model, modality, path) -> str:
    assert main(["predict", model, "--modality", modality, "--input", path, "--prompt",
                 TASKS[modality].instruction, "--device", "cpu"]) == 0
    return capsys.readouterr().out.rstrip("\n")


def test_export_writes_the_final_model_and_what_ties_it(run, exported):
    cfg, final = run["cfg"], run["final"]
    files = {os.path.relpath(os.path.join(d, n), exported)
             for d, _, names in os.walk(exported) for n in names}
    assert files == {"mera_model.json", *(f"llm/{n}" for n in os.listdir(final.spec.llm)),
                     *(f"connectors/{m}.safetensors" for m in run["layout"].order)}
    for m, url in final.spec.connectors.items():  # copied as they are
        with open(url, "rb") as a, open(os.path.join(exported, "connectors",
                                                     f"{m}.safetensors"), "rb") as b:
            assert a.read() == b.read()
    doc = json.loads(open(os.path.join(exported, "mera_model.json")).read())
    assert (doc["format"], doc["version"]) == ("mera-model", 1)
    assert doc["llm"] == {"path": "llm", "dtype": "float32", "attn_implementation": "auto",
                          "max_length": 64}
    assert [m["name"] for m in doc["modalities"]] == ["image", "video", "audio", "depth"]
    video = doc["modalities"][1]
    assert video["encoder"] == cfg.modality("video").encoder.model_dump(mode="json")
    assert video["encoder"]["type"] == "video" and video["encoder"]["num_frames"] == 4
    assert video["connector"] == {"type": "mlp2x_gelu", "file": "connectors/video.safetensors"}
    assert video["task"] == {"metric": "exact_match", "extra_metrics": [], "max_new_tokens": 8}
    recorded = json.loads(open(run["layout"].manifest).read())["steps"][final.name]["result"]
    assert doc["source"] == {"run_dir": run["dir"], "config_digest": cfg.digest(),
                             "eval_step": "04-depth/evaluate", "scores": recorded["scores"],
                             "samples": {m: 4 for m in run["layout"].order}}
    assert bundle.read(exported).modalities[2].encoder.type == "whisper"


def test_the_run_config_comes_back_from_its_manifest(run):
    """As the manifest records it, also where the DeepSpeed JSON the run read is not (another
    machine): it plans nothing, and is kept so the digest stays the run's."""
    def config(recorded):
        return Manifest("m.json", {"config": recorded}, {}).config()

    recorded = run["cfg"].fingerprint()
    assert config(recorded).fingerprint() == recorded
    elsewhere = {**recorded, "cluster.deepspeed_config": "/nowhere/zero3.json"}
    cfg = config(elsewhere)
    assert cfg.fingerprint() == elsewhere and cfg.modalities == run["cfg"].modalities
    with pytest.raises(MeraError, match=r"m\.json: stages\.eval\.batch_size: Input should be"):
        config({**recorded, "stages.eval.batch_size": "x"})


def test_export_refuses_an_unfinished_run_and_an_existing_directory(run, exported, tmp_path,
                                                                   capsys):
    cfg = run["cfg"].model_copy(update={"run_dir": str(tmp_path / "unfinished")})
    Manifest.open(RunLayout.of(cfg), cfg, "mera", resume=False)  # nothing done yet
    with pytest.raises(MeraError, match=r"unfinished: its final evaluation \(04-depth/evaluate\)"
                                        r" is not recorded as finished"):
        bundle.export(cfg.run_dir, str(tmp_path / "model"))
    assert not os.path.exists(tmp_path / "model")

    before = os.path.getmtime(os.path.join(exported, "mera_model.json"))
    assert main(["export", run["dir"], "--out", exported]) == 2
    assert capsys.readouterr().err == f"mera: error: {exported}: already exists; --force " \
                                      f"replaces it\n"
    assert os.path.getmtime(os.path.join(exported, "mera_model.json")) == before
    again = str(tmp_path / "again")
    shutil.copytree(exported, again)
    assert main(["export", run["dir"], "--out", again, "--force"]) == 0
    assert "04-depth/evaluate" in capsys.readouterr().out
    assert bundle.read(again) == bundle.read(exported)


def test_predict_answers_as_the_runs_own_model(run, exported, questions, capsys):
    expected = by_hand(run, {m: sample for m, (_, sample) in questions.items()})
    got = {m: predict(capsys, exported, m, path) for m, (path, _) in questions.items()}
    assert got == expected
    assert any(got.values())  # not all empty: the comparison says something


def test_batch_answers_every_line_in_order(run, exported, questions, tmp_path, capsys):
    order = ["depth", "image", "video", "audio", "image"]
    lines = [{"modality": m, "input": questions[m][0], "prompt": TASKS[m].instruction}
             for m in order]
    lines[1]["id"] = 7
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "a.jsonl"
    assert main(["predict", exported, "--batch", str(tmp_path / "q.jsonl"), "--out", str(out),
                 "--batch-size", "2", "--device", "cpu"]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    single = {m: predict(capsys, exported, m, questions[m][0]) for m in set(order)}
    assert answers == [{**x, "answer": single[x["modality"]]} for x in lines]

    # A missing input file: the error names its line, and nothing is written.
    lines[2]["input"] = str(tmp_path / "missing.wav")
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["predict", exported, "--batch", str(tmp_path / "bad.jsonl"), "--out",
                 str(tmp_path / "b.jsonl"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.endswith(f"mera: error: {tmp_path / 'bad.jsonl'}:3: "
                                            f"{tmp_path / 'missing.wav'}: no such file\n")
    assert not os.path.exists(tmp_path / "b.jsonl")


def test_bad_questions_are_one_line_errors(exported, questions, tmp_path, capsys):
    cases = {
        '{"modality": "image", "input": "x.png"}\n': "q.jsonl:1: no string 'prompt'",
        '\n{"modality": "smell", "input": "x", "prompt": "p"}\n':
            "q.jsonl:2: modality 'smell' is not in this model (it has image, video, audio, depth)",
        '{"modality": "image", "input": "x", "prompt": "p", "lang": "en"}\n':
            "q.jsonl:1: unknown field 'lang'",
        "[1]\n": "q.jsonl:1: not a JSON object",
    }
    for text, error in cases.items():
        (tmp_path / "q.jsonl").write_text(text)
        assert main(["predict", exported, "--batch", str(tmp_path / "q.jsonl")]) == 2
        assert capsys.readouterr().err.endswith(f"mera: error: {tmp_path}/{error}\n")
    image, depth = questions["image"][0], questions["depth"][0]
    for modality, path, error in [
            ("depth", image, f"{image}: not a .npy file"),
            ("image", depth, f"{depth}: does not decode as an image"),
            ("image", questions["video"][0], "expects input_kind 'image', got 'video'"),
            ("video", questions["video"][0].rsplit("#")[0] + "#nokey", "no sample with key")]:
        assert main(["predict", exported, "--modality", modality, "--input", path,
                     "--prompt", "p"]) == 2
        assert error in capsys.readouterr().err
    assert main(["predict", str(tmp_path), "--modality", "image", "--input", image,
                 "--prompt", "p"]) == 2
    assert f"{tmp_path}: no mera_model.json" in capsys.readouterr().err


def test_the_exported_model_needs_no_run(run, exported, questions, tmp_path, capsys):
    """Everything but the (tiny, rebuilt) encoders is in the exported directory."""
    expected = {m: predict(capsys, exported, m, path) for m, (path, _) in questions.items()}
    moved = str(tmp_path / "gone")
    os.rename(run["dir"], moved)
    try:
        assert {m: predict(capsys, exported, m, path)
                for m, (path, _) in questions.items()} == expected
    finally:
        os.rename(moved, run["dir"])


def test_export_to_and_predict_from_s3(run, exported, questions, s3_bucket, tmp_path,
                                       monkeypatch, capsys):
    monkeypatch.setenv("MERA_CACHE_DIR", str(tmp_path / "cache"))
    url = f"{s3_bucket}/models/final"
    bundle.export(run["dir"], url)
    assert bundle.read(url) == bundle.read(exported)
    path = questions["audio"][0]
    assert predict(capsys, url, "audio", path) == predict(capsys, exported, "audio", path)
