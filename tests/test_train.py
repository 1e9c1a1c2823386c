"""The per-modality training job: 2 ranks, ZeRO-3, gloo, the tiny model, the built-in shards."""
import copy
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from mera_ds.config import parse_config
from mera_ds.run.layout import RunLayout
from tests.conftest import free_port, mera_env, ray_train_worker_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(cfg: dict, phase: str, modality: str, out, env=None, check=True, method=None):
    """tests/dist_job.py on 2 ranks: the step of the config's run (or of the benchmark method
    `method`)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "config.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           os.path.join(ROOT, "tests", "dist_job.py"), path, phase, modality, str(out),
           *([method] if method else [])]
    shm = set(glob.glob("/dev/shm/deepspeed_*"))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": ROOT,
                               "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    assert set(glob.glob("/dev/shm/deepspeed_*")) <= shm, "the job left DeepSpeed buffers"
    return proc


def small(cfg, steps=24):
    cfg["stages"]["finetune"].update(steps=steps, warmup_steps=2)
    cfg["stages"]["realign"].update(steps=6)
    cfg["stages"]["align"].update(steps=6, batch_size=16, micro_batch_size=8)
    return cfg


def hf_tensors(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    return {n: p.detach() for n, p in model.named_parameters()}


def equal_prefix(tensors: dict, prefix: str, other: dict) -> bool:
    keys = [k for k in tensors if k.startswith(prefix)]
    assert keys
    return all(torch.equal(tensors[k], other[k]) for k in keys)


def test_finetune_two_stages_zero3(tiny_config, tmp_path):
    cfg = small(tiny_config)
    layout = RunLayout.of(parse_config(cfg))
    torchrun(cfg, "finetune", "image", tmp_path / "image")
    start = load_file(tmp_path / "image" / "start-full.safetensors")
    end = load_file(tmp_path / "image" / "end-full.safetensors")
    metrics = json.loads((tmp_path / "image" / "metrics.json").read_text())

    # Loss goes down on the image shards.
    assert metrics["loss"] < 0.7 * metrics["first_loss"], metrics

    # Each rank holds about half of every partitioned LLM parameter, and the two halves are it.
    exported = hf_tensors(layout.finetune_llm("image"))
    parts = [load_file(tmp_path / "image" / f"end-partition-rank{r}.safetensors") for r in (0, 1)]
    for name, full in exported.items():
        n = full.numel()
        for part in parts:
            assert abs(part[name].numel() - n / 2) <= 1, name
        joined = torch.cat([parts[0][name], parts[1][name]])[:n]
        assert torch.equal(joined.view_as(full), full), name
        assert torch.equal(end[f"llm.{name}"], full), name  # exported == trained

    # The LLM and connector_image trained; the frozen encoder did not.
    assert not equal_prefix(start, "llm.", end)
    assert not equal_prefix(start, "connector.image.", end)
    assert equal_prefix(start, "encoder.", end)
    connector = load_file(layout.finetune_connector("image"))
    assert all(torch.equal(v, end[f"connector.image.{k}"]) for k, v in connector.items())
    stage_dir = os.path.dirname(layout.finetune_llm("image"))
    assert sorted(os.listdir(stage_dir)) == ["connectors", "llm"]  # nothing half-written left

    # Stage 2 starts from stage 1's LLM and leaves stage 1's artifacts as they were.
    before = {p: open(p, "rb").read() for p in [layout.finetune_connector("image")]}
    torchrun(cfg, "finetune", "video", tmp_path / "video")
    start2 = load_file(tmp_path / "video" / "start-full.safetensors")
    assert all(torch.equal(start2[f"llm.{n}"], t) for n, t in exported.items())
    assert "connector.image.0.weight" not in start2  # only connector_video is in the job
    assert all(open(p, "rb").read() == b for p, b in before.items())
    exported2 = hf_tensors(layout.finetune_llm("video"))
    assert any(not torch.equal(exported2[n], exported[n]) for n in exported)

    # Stage 2's realign (stage 1 has none), on the 10% replays, after the merge: only the
    # connectors train, each from its finetune; the merged LLM's files stay byte-identical.
    from mera_ds.data.replay import sample_replay
    from mera_ds.run.local import run_step
    from mera_ds.run.plan import Method, find_step, plan

    parsed = parse_config(cfg)
    run_step(parsed, find_step(plan(parsed, Method.of(parsed), layout), "merge", "video"))
    for m in cfg["modalities"][:2]:
        sample_replay(m["train_shards"], layout.replay_dir(m["name"]), 0.1, seed=0)
    merged = layout.merge_llm("video")
    llm_files = {n: open(os.path.join(merged, n), "rb").read() for n in os.listdir(merged)}
    torchrun(cfg, "realign", "video", tmp_path / "realign")
    start_r = load_file(tmp_path / "realign" / "start-full.safetensors")
    end_r = load_file(tmp_path / "realign" / "end-full.safetensors")
    assert equal_prefix(start_r, "llm.", end_r) and equal_prefix(start_r, "encoder.", end_r)
    realigned = {}
    for m in ("image", "video"):
        assert not equal_prefix(start_r, f"connector.{m}.", end_r)
        assert all(torch.equal(v, start_r[f"connector.{m}.{k}"])
                   for k, v in load_file(layout.finetune_connector(m)).items())
        realigned[m] = load_file(layout.realign_connector("video", m))
        assert all(torch.equal(v, end_r[f"connector.{m}.{k}"]) for k, v in realigned[m].items())
    assert llm_files == {n: open(os.path.join(merged, n), "rb").read() for n in os.listdir(merged)}
    # auto: the tiny LLM fits, so it was replicated (no ZeRO). The same realign with the LLM
    # partitioned (zero3) trains the same connectors, up to float32 reduction order.
    assert json.loads((tmp_path / "realign" / "metrics.json").read_text())["zero_stage"] == 0
    shutil.rmtree(os.path.dirname(os.path.dirname(layout.realign_connector("video", "video"))))
    zero3 = copy.deepcopy(cfg)
    zero3["stages"]["realign"]["mode"] = "zero3"
    torchrun(zero3, "realign", "video", tmp_path / "realign-zero3")
    assert json.loads((tmp_path / "realign-zero3" / "metrics.json").read_text())[
        "zero_stage"] == 3
    for m in ("image", "video"):
        for k, v in load_file(layout.realign_connector("video", m)).items():
            torch.testing.assert_close(v, realigned[m][k], rtol=1e-4, atol=1e-6)


def test_align_trains_only_the_connector(tiny_config, tmp_path):
    cfg = small(tiny_config)
    cfg["stages"]["align"]["enabled"] = True
    layout = RunLayout.of(parse_config(cfg))
    torchrun(cfg, "align", "image", tmp_path)
    start = load_file(tmp_path / "start-full.safetensors")
    end = load_file(tmp_path / "end-full.safetensors")
    assert equal_prefix(start, "llm.", end)
    assert equal_prefix(start, "encoder.", end)
    assert not equal_prefix(start, "connector.image.", end)
    saved = load_file(layout.align_connector("image"))
    assert all(torch.equal(v, end[f"connector.image.{k}"]) for k, v in saved.items())
    assert not os.path.exists(layout.finetune_llm("image"))


def test_hung_rank_times_out_naming_step_and_rank(tiny_config, tmp_path):
    cfg = small(tiny_config)
    cfg["cluster"]["timeout_s"] = 10
    t0 = time.time()
    proc = torchrun(cfg, "finetune", "image", tmp_path, env={"TEST_SLEEP_RANK": "1"},
                    check=False)
    assert proc.returncode != 0
    assert "01-image/finetune: rank 0: a collective failed or timed out" in proc.stderr
    assert time.time() - t0 < 120
    assert not os.path.exists(RunLayout.of(parse_config(cfg)).finetune_llm("image"))


def test_ray_job_survives_a_killed_worker(tiny_config, tmp_path):
    cfg = small(tiny_config, steps=30)
    cfg["cluster"]["max_failures"] = 1
    cfg_path = tmp_path / "config.yaml"
    import yaml
    cfg_path.write_text(yaml.safe_dump(cfg))
    layout = RunLayout.of(parse_config(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mera_ds", "stage", "finetune", "--config", str(cfg_path),
         "--modality", "image", "--checkpoint-every", "10"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    # Ray writes this once it has registered a reported checkpoint (asynchronously).
    snapshot = os.path.join(layout.train_state("image", "finetune"), "ray",
                            "checkpoint_manager_snapshot.json")
    output, killed = [], None
    deadline = time.time() + 600
    for line in proc.stdout:
        output.append(line)
        # Once a checkpoint is registered, kill one of the two training workers mid-run.
        if killed is None and " step " in line and "/30 loss" in line and os.path.exists(snapshot):
            killed = ray_train_worker_of(proc.pid)
            os.kill(killed, 9)
        assert time.time() < deadline
    text = "".join(output)
    assert proc.wait() == 0, text[-4000:]
    assert killed, "no worker was killed"
    metrics, _ = json.JSONDecoder().raw_decode(text[text.rindex("\n{\n  ") + 1:])
    # The restarted job continued from the checkpoint; it did not start over.
    assert metrics["resumed_at"] in (10, 20)
    assert f"resuming at step {metrics['resumed_at']} of 30" in text
    assert metrics["steps"] == 30
    assert os.path.exists(os.path.join(layout.finetune_llm("image"), "config.json"))
    assert not os.path.exists(layout.train_state("image", "finetune"))


def test_ray_job_does_not_retry_bad_input(tiny_config, tmp_path):
    """A corrupt shard (found only when it is read, inside a worker) fails the job at once, with
    max_failures restarts allowed: running it again would fail the same way."""
    from mera_ds.data.tar import expand_shards

    cfg = small(tiny_config, steps=4)
    cfg["cluster"]["max_failures"] = 2
    urls = expand_shards(cfg["modalities"][0]["train_shards"])
    for k, url in enumerate(urls):
        data = open(url, "rb").read()
        (tmp_path / f"cut-{k}.tar").write_bytes(data[: len(data) // 3])
    cfg["modalities"][0]["train_shards"] = str(tmp_path / "cut-{0..3}.tar")
    cfg_path = tmp_path / "config.yaml"
    import yaml
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "mera_ds", "stage", "finetune", "--config", str(cfg_path),
         "--modality", "image"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    # (Ray's own log lines from the workers may come after it.)
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("mera: error: ")]
    assert line.startswith("mera: error: 01-image/finetune failed on the cluster: ")
    assert "cut-" in line and "corrupt shard" in line
    assert "restarting from its latest checkpoint" not in proc.stderr


def test_two_stages_at_once_each_with_its_own_local_ray(tiny_config, tmp_path):
    """Two `mera stage` commands on one machine, each starting a local Ray instance: neither
    finds the other's (Ray Train's helpers look an instance up by address)."""
    import yaml

    procs = []
    for name in ("a", "b"):
        cfg = small(json.loads(json.dumps(tiny_config)), steps=4)
        cfg["run_dir"] = str(tmp_path / name)
        cfg["cluster"]["num_workers"] = 1
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "mera_ds", "stage", "finetune", "--config", str(path),
             "--modality", "image"], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env=mera_env()))
        time.sleep(3)  # both up at once, but not starting in the same second
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
        assert "multiple active Ray instances" not in out
    for name in ("a", "b"):
        steps = json.loads((tmp_path / name / "manifest.json").read_text())["steps"]
        assert list(steps) == ["01-image/finetune"]


def test_deepspeed_launcher_runs_a_training_step(tiny_config, tmp_path):
    """The third way to run a step: `deepspeed --module mera_ds stage finetune` (2 ranks), which
    records it in the run's manifest as `mera run` would."""
    cfg = small(tiny_config, steps=4)
    path = tmp_path / "config.yaml"
    import yaml
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         "--module", "mera_ds", "stage", "finetune", "--config", str(path), "--modality", "image",
         "--executor", "local"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    layout = RunLayout.of(parse_config(cfg))
    assert hf_tensors(layout.finetune_llm("image"))
    assert os.path.exists(layout.finetune_connector("image"))
    assert not os.path.exists(layout.train_state("image", "finetune"))  # resume state cleared
    steps = json.loads(open(layout.manifest).read())["steps"]
    assert list(steps) == ["01-image/finetune"] and steps["01-image/finetune"]["result"]["loss"]


class _Planted:
    """What someone with write access to a shared run dir could leave in its resume state."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickle_in_resume_state_is_refused(tmp_path):
    from mera_ds.errors import MeraError
    from mera_ds.train.runtime import load_state_file

    marker = tmp_path / "code-ran"
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": _Planted(str(marker))}, path)
    with pytest.raises(MeraError, match=r"optim_states\.pt: resume state refused"):
        load_state_file(str(path))
    assert not marker.exists()
    # What DeepSpeed itself saves loads (the resumed runs of test_pipeline load real ones).
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.weights,
                "state": {"step": torch.tensor(3)}}, path)
    assert load_state_file(str(path))["zero_stage"] == ZeroStageEnum.weights


def test_resumed_job_trains_exactly_as_an_uninterrupted_one(builtin_shards, tmp_path):
    """A job that crashes after its step-2 checkpoint and is resumed from it exports the LLM an
    uninterrupted job exports: same state, same data (the resumed loader skips the batches
    already taken instead of drawing new ones)."""
    from mera_ds.run.plan import Method, find_step, plan
    from mera_ds.train.recipe import run_job
    from mera_ds.train.runtime import DirCheckpointer
    from tests.conftest import Crash, crashing_checkpointer, default_config

    def spec_of(run):
        cfg = default_config(builtin_shards, tmp_path / run)
        cfg["stages"]["finetune"].update(steps=4, warmup_steps=1)
        cfg = parse_config(cfg)
        return cfg, find_step(plan(cfg, Method.of(cfg), RunLayout.of(cfg)), "finetune",
                              "image").spec

    cfg, spec = spec_of("straight")
    run_job(cfg, spec)
    cfg, resumed = spec_of("resumed")
    with pytest.raises(Crash):
        run_job(cfg, resumed, crashing_checkpointer(str(tmp_path / "state")), 2)
    metrics = run_job(cfg, resumed, DirCheckpointer(str(tmp_path / "state")), 2)
    assert metrics["resumed_at"] == 2
    a, b = hf_tensors(spec.export_llm), hf_tensors(resumed.export_llm)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_zero_offload_config_trains_with_deepspeed_cpu_adam(tiny_config, tmp_path):
    """ds_configs/zero3_offload_bf16.json (optimizer and parameters offloaded to the CPU, bf16):
    DeepSpeed refuses torch's AdamW there; the job steps DeepSpeed's CPU Adam and trains."""
    cfg = small(tiny_config, steps=6)
    cfg["cluster"]["deepspeed_config"] = "ds_configs/zero3_offload_bf16.json"
    cfg["llm"]["dtype"] = "bfloat16"
    torchrun(cfg, "finetune", "image", tmp_path / "out")
    start = load_file(tmp_path / "out" / "start-full.safetensors")
    end = load_file(tmp_path / "out" / "end-full.safetensors")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["optimizer"] == "DeepSpeedCPUAdam"
    assert start["llm.model.embed_tokens.weight"].dtype == torch.bfloat16
    assert not equal_prefix(start, "llm.", end) and not equal_prefix(start, "connector.", end)
    assert metrics["loss"] < metrics["first_loss"], metrics


def test_lora_finetune_zero3(tiny_config, tmp_path):
    """stages.finetune.lora: only the adapters and the connector train (under ZeRO-3, 2 ranks);
    the exported LLM is the base with (alpha / r) B A folded in, a plain HF model; the adapter
    beside it loads with peft; two LoRA stages merge by MERA's formula."""
    from peft import PeftModel

    from mera_ds.config import LLMConfig
    from mera_ds.merge.engine import merge_llm
    from mera_ds.model.llm import build_llm

    r, alpha = 4, 8.0
    cfg = small(tiny_config, steps=16)
    cfg["stages"]["finetune"].update(lora={"r": r, "alpha": alpha}, lr_llm=1e-2)
    run_cfg = parse_config(cfg)
    layout = RunLayout.of(run_cfg)
    torchrun(cfg, "finetune", "image", tmp_path / "image")
    start = load_file(tmp_path / "image" / "start-full.safetensors")
    end = load_file(tmp_path / "image" / "end-full.safetensors")
    metrics = json.loads((tmp_path / "image" / "metrics.json").read_text())
    assert metrics["loss"] < metrics["first_loss"], metrics

    # Trainable: the adapters of the 7 linear layers of each of the 2 layers (r x (in + out)
    # each; the tiny Llama is 128 wide, 256 in its MLP) and connector_image, nothing else.
    trainable = json.loads((tmp_path / "image" / "trainable.json").read_text())
    llm_trainable = {n: k for n, k in trainable.items() if n.startswith("llm.")}
    assert all(".lora_A." in n or ".lora_B." in n for n in llm_trainable)
    assert sum(llm_trainable.values()) == 2 * r * (4 * (128 + 128) + 3 * (128 + 256))
    assert {n.split(".")[0] for n in trainable} == {"llm", "connectors"}

    exported = hf_tensors(layout.finetune_llm("image"))
    base = "llm.base_model.model."
    for name, w in exported.items():
        layer = name.rsplit(".", 1)[0]
        if f"{base}{layer}.base_layer.weight" in start:  # adapted: W + (alpha / r) B A
            w0 = start[f"{base}{layer}.base_layer.weight"]
            assert torch.equal(end[f"{base}{layer}.base_layer.weight"], w0)  # base frozen
            a, b = end[f"{base}{layer}.lora_A.default.weight"], \
                end[f"{base}{layer}.lora_B.default.weight"]
            assert b.abs().max() > 0, name
            torch.testing.assert_close(w, w0 + alpha / r * b @ a, rtol=1e-5, atol=1e-6)
        else:  # not adapted: as it started
            assert torch.equal(w, start[f"{base}{name}"]), name
    assert sum(".q_proj." in n for n in exported) == 2

    # The adapter, in peft's layout, on the LLM the job started from, gives the same model as
    # the folded export.
    tiny_llm, _ = build_llm(LLMConfig(**cfg["llm"]))
    tiny_llm.load_state_dict({k[len(base):].replace(".base_layer.", "."): v
                              for k, v in start.items()
                              if k.startswith(base) and ".lora_" not in k})
    adapter_dir = os.path.join(layout.finetune_llm("image"), "adapter")
    peft_llm = PeftModel.from_pretrained(tiny_llm, adapter_dir).merge_and_unload()
    for name, p in peft_llm.named_parameters():
        torch.testing.assert_close(p.detach(), exported[name], rtol=1e-5, atol=1e-6)

    # Stage 2, LoRA again from stage 1's (folded) LLM; merge: theta_2 = (theta_1 + ft_2) / 2.
    torchrun(cfg, "finetune", "video", tmp_path / "video")
    ft2 = hf_tensors(layout.finetune_llm("video"))
    assert any(not torch.equal(ft2[n], exported[n]) for n in exported)
    merge_llm(layout.finetune_llm("image"), [layout.finetune_llm("video")],
              layout.merge_llm("video"), run_cfg.stages.merge, step=2)
    merged = hf_tensors(layout.merge_llm("video"))
    for name, w in merged.items():
        torch.testing.assert_close(w, exported[name] + (ft2[name] - exported[name]) / 2)
