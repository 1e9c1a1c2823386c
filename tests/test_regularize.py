"""The replay-free baselines of `mera bench mcl`: LwF's loss is CE + alpha T^2 KL(teacher ||
student) on the answer positions; EWC's penalty and its gradient are the formula, for full and
LoRA finetunes; the Fisher is the mean squared batch gradient (plus the earlier stages'); the
plans of ewc and lwf; a two-stage benchmark of both; and on 2 ranks under ZeRO-3 the Fisher and
the penalised finetunes (full, LoRA) are what one process computes on the same batches."""
import copy
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from mera_ds.config import parse_config
from mera_ds.errors import MeraError
from mera_ds.run.layout import RunLayout
from mera_ds.run.mcl import EVERY_METHOD
from mera_ds.run.plan import Method, find_step, plan
from mera_ds.run.schedule import dependencies

from .conftest import ROOT, mera_env, two_modalities
from .test_merge import state

IGNORE = -100


def small(cfg: dict, **finetune) -> dict:
    """Two modalities (image, video), short finetunes of 4-sample batches."""
    cfg = two_modalities(cfg)
    cfg["stages"]["finetune"].update({"steps": 3, "warmup_steps": 0, "batch_size": 4,
                                      "micro_batch_size": 2, "ewc_batches": 2, **finetune})
    return cfg


def batches_of(cfg, spec, mllm, rank: int = 0, world: int = 1) -> list:
    """The micro-batches rank `rank` of `world` reads in job `spec` (the job's own loader)."""
    from mera_ds.train.recipe import setup_data

    accumulation = spec.settings.batch_size // (spec.settings.micro_batch_size * world)
    engine = SimpleNamespace(gradient_accumulation_steps=lambda: accumulation, module=mllm)
    with mock.patch("torch.distributed.get_rank", return_value=rank), \
            mock.patch("torch.distributed.get_world_size", return_value=world):
        return list(setup_data(cfg, spec, engine, 0))


def random_fisher(llm_dir, out, scale: float = 1.0) -> str:
    """A Fisher directory over the tensors of `llm_dir`: uniform in [0, scale)."""
    g = torch.Generator().manual_seed(0)
    os.makedirs(out)
    save_file({n: torch.rand(t.shape, generator=g) * scale for n, t in state(llm_dir).items()},
              os.path.join(out, "model.safetensors"))
    return str(out)


# --- LwF -----------------------------------------------------------------------------------------

def test_lwf_loss_is_ce_plus_alpha_t2_kl_on_the_answer_positions(tiny_config, one_thread):
    from mera_ds.data.loader import make_loader
    from mera_ds.model.llm import build_llm
    from mera_ds.model.lwf import Distillation
    from mera_ds.model.mllm import Collator, build_mllm

    cfg = parse_config(tiny_config)
    mllm = build_mllm(cfg, modalities=["image"])
    teacher, _ = build_llm(cfg.llm)
    with torch.no_grad():  # another LLM than the student
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    alpha, T = 0.7, 1.5
    mllm.distill = Distillation(teacher, alpha, T)
    mllm.train()
    assert not teacher.training and mllm.llm.training
    batch = next(iter(make_loader(cfg.modality("image").train_shards, batch_size=4, num_steps=1,
                                  collate_fn=Collator(mllm, train=True, pack=True))))
    loss = mllm(batch).loss

    embeds = mllm.embed(batch).detach()
    # Packed rows: no cache, so that transformers builds per-sample attention from the positions.
    inputs = dict(inputs_embeds=embeds, position_ids=batch["position_ids"], use_cache=False)
    student = mllm.llm(**inputs).logits.double()
    with torch.no_grad():
        t = teacher(**inputs).logits.double()
    answer = batch["labels"][:, 1:] != IGNORE  # logits at p predict token p + 1
    assert 0 < answer.sum() < answer.numel()
    s, t = student[:, :-1][answer], t[:, :-1][answer]
    ce = F.cross_entropy(s, batch["labels"][:, 1:][answer])
    p_t, p_s = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    torch.testing.assert_close(loss.double(), ce + alpha * T ** 2 * kl, rtol=1e-5, atol=1e-6)

    loss.backward()  # the student learns; the teacher is frozen
    assert all(p.grad is None for p in teacher.parameters())
    assert mllm.llm.get_input_embeddings().weight.grad is not None

    # A teacher equal to the student adds nothing: LwF's first step is seq's.
    mllm.distill = Distillation(copy.deepcopy(mllm.llm), alpha, T)
    plain = mllm.llm(**inputs, labels=batch["labels"]).loss
    torch.testing.assert_close(mllm(batch).loss, plain, rtol=1e-6, atol=1e-6)


# --- EWC -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_ewc_penalty_and_its_gradient_are_the_formula(tiny_config, tmp_path, one_thread, lora):
    """One process under ZeRO-3 (the partition is the tensor): after a batch's backward, the
    penalty adds lambda F (W - W*) to a full finetune's gradient, and to a LoRA finetune's
    adapters the gradient of (lambda / 2) sum F (scaling B A)^2; it returns that sum."""
    from deepspeed.utils import (safe_get_local_fp32_param, safe_get_local_grad,
                                 safe_set_local_fp32_param)

    from mera_ds.model.llm import write_llm
    from mera_ds.model.lora import adapters
    from mera_ds.train.jobs import finetune_job
    from mera_ds.train.recipe import ewc_penalty, setup_engine
    from mera_ds.train.runtime import init_distributed, to_device

    lam = 3.0
    cfg = small(tiny_config, ewc_lambda=lam, **({"lora": {"r": 4, "alpha": 8}} if lora else {}))
    run_cfg = parse_config(cfg)
    anchor = str(tmp_path / "theta1")
    write_llm(run_cfg.llm, anchor, "100MB")
    fisher = random_fisher(anchor, tmp_path / "fisher")
    spec = finetune_job(run_cfg, "video", anchor, [run_cfg.modality("video").train_shards], {},
                        out_llm=str(tmp_path / "out"),
                        out_connectors={"video": str(tmp_path / "video.safetensors")},
                        fisher=fisher,
                        name="t", tensorboard=None, state=None)
    init_distributed(run_cfg)
    engine = setup_engine(run_cfg, spec, torch.device("cpu"))
    penalty = ewc_penalty(spec, engine)
    llm = engine.module.llm
    trained = {n: p for n, p in llm.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(1)
    for p in trained.values():  # away from W*: every W - W*, B A included, non-zero
        w = safe_get_local_fp32_param(p)
        safe_set_local_fp32_param(p, w + 0.05 * torch.randn(w.shape, generator=g))
    batch = to_device(batches_of(run_cfg, spec, engine.module)[0], torch.device("cpu"))
    engine.backward(engine(batch).loss)
    before = {n: safe_get_local_grad(p).clone() for n, p in trained.items()}
    value = penalty.apply(engine)
    # One rank: each partition is its whole tensor, flattened.
    added = {n: (safe_get_local_grad(p) - before[n]).view(p.ds_shape) for n, p in trained.items()}
    W = {n: safe_get_local_fp32_param(p).double().view(p.ds_shape) for n, p in trained.items()}
    Fs, anchors = state(fisher), state(anchor)
    if not lora:
        assert set(trained) == set(anchors)
        want = sum((Fs[n].double() * (W[n] - anchors[n].double()) ** 2).sum() for n in W)
        for n in W:
            torch.testing.assert_close(added[n].double(),
                                       lam * Fs[n].double() * (W[n] - anchors[n].double()),
                                       rtol=1e-5, atol=1e-7)
    else:
        names = {id(p): n for n, p in trained.items()}
        leaves = {n: w.clone().requires_grad_() for n, w in W.items()}
        want = 0
        for name, (a, b, scaling) in adapters(llm).items():
            A, B = leaves[names[id(a)]], leaves[names[id(b)]]
            want = want + (Fs[name].double() * (scaling * B @ A) ** 2).sum()
        assert len(adapters(llm)) == 14 and set(names.values()) == set(leaves)
        grads = torch.autograd.grad(lam / 2 * want, list(leaves.values()))
        for (n, _), grad in zip(leaves.items(), grads):
            torch.testing.assert_close(added[n].double(), grad, rtol=1e-5, atol=1e-7)
    assert value == pytest.approx(float(lam / 2 * want.detach()), rel=1e-5)
    assert value > 0


def test_fisher_is_the_mean_squared_batch_gradient_plus_the_earlier(tiny_config, tmp_path,
                                                                    one_thread):
    """One process, two micro-batches a batch: the Fisher file holds, per tensor, the squared
    gradient of each batch's loss (the mean over its micro-batches) averaged over ewc_batches
    batches, plus the earlier stages' Fisher; every weight of the LLM has one."""
    from mera_ds.model.connectors import load_connector, save_connector
    from mera_ds.model.llm import build_llm, write_llm
    from mera_ds.model.mllm import build_mllm
    from mera_ds.train.jobs import fisher_job
    from mera_ds.train.recipe import run_job

    cfg = small(tiny_config, ewc_batches=3)
    run_cfg = parse_config(cfg)
    llm_dir, connector = str(tmp_path / "theta"), str(tmp_path / "image.safetensors")
    write_llm(run_cfg.llm, llm_dir, "100MB")
    save_connector(build_mllm(run_cfg, modalities=["image"]).connectors["image"], connector)
    earlier = random_fisher(llm_dir, tmp_path / "earlier", scale=1e-8)  # this one's scale
    spec = fisher_job(run_cfg, "image", llm_dir, connector, earlier, str(tmp_path / "fisher"),
                      name="t", tensorboard=None, state=None)
    assert spec.inputs == (llm_dir, connector, earlier) and spec.outputs == (
        str(tmp_path / "fisher"),)
    metrics = run_job(run_cfg, spec)
    assert metrics["batches"] == 3
    written = state(tmp_path / "fisher")

    mllm = build_mllm(run_cfg, ["image"], *build_llm(run_cfg.llm, path=llm_dir))
    load_connector(mllm.connectors["image"], connector)
    mllm.eval()
    micro = batches_of(run_cfg, spec, mllm)
    assert len(micro) == 6
    want = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in mllm.llm.named_parameters()}
    for b in range(3):
        mllm.zero_grad()
        ((mllm(micro[2 * b]).loss + mllm(micro[2 * b + 1]).loss) / 2).backward()
        for n, p in mllm.llm.named_parameters():
            want[n] += p.grad.double() ** 2
    before = state(earlier)
    assert set(written) == set(want) == set(state(llm_dir))
    for n, w in want.items():
        assert written[n].dtype == torch.float32
        torch.testing.assert_close(written[n].double() - before[n].double(), w / 3,
                                   rtol=1e-4, atol=1e-5 * float(w.max() / 3))
    assert max(float(w.max()) for w in want.values()) > 0


# --- the plan ------------------------------------------------------------------------------------

def test_the_plans_of_ewc_and_lwf(tiny_config):
    cfg = parse_config(tiny_config)  # image, video, audio, depth
    layout = RunLayout.of(cfg)
    seq = plan(cfg, EVERY_METHOD["seq-ft"], layout, chained=True)
    ewc = plan(cfg, EVERY_METHOD["ewc"], layout, chained=True)
    lwf = plan(cfg, EVERY_METHOD["lwf"], layout, chained=True)
    first, chain = layout.of_chain("first"), layout.of_chain("seq-ewc")
    order = cfg.modalities

    # Stage 1 is seq's, step for step; ewc adds the Fisher of theta_1 beside it.
    stage1 = [s for s in seq if s.modality == "image"]
    assert [s for s in lwf if s.modality == "image"] == stage1
    assert [s.name for s in ewc if s.modality == "image"] == [
        "first/01-image/finetune", "first/01-image/fisher", "first/01-image/evaluate"]
    assert [s for s in ewc if s.modality == "image" and s.phase != "fisher"] == stage1

    by_name = {s.name: s.spec for s in ewc}
    f1 = by_name["first/01-image/fisher"]
    assert (f1.phase, f1.init_llm, f1.init_connectors, f1.fisher, f1.export_fisher) == (
        "fisher", first.finetune_llm("image"), {"image": first.finetune_connector("image")},
        None, first.fisher("image"))
    assert f1.lora is None and f1.data == (order[0].train_shards,)
    assert f1.settings.steps == cfg.stages.finetune.ewc_batches
    for i, m in enumerate(["video", "audio", "depth"], 2):
        prev = first if i == 2 else chain
        before = order[i - 2].name
        ft = by_name[f"seq-ewc/0{i}-{m}/finetune"]
        assert (ft.init_llm, ft.fisher, ft.lwf) == (prev.finetune_llm(before),
                                                    prev.fisher(before), False)
        assert ft.outputs == (chain.finetune_llm(m), chain.finetune_connector(m))
        assert prev.fisher(before) in ft.inputs
        fisher = by_name.get(f"seq-ewc/0{i}-{m}/fisher")
        if m == "depth":  # no stage after the last: no Fisher
            assert fisher is None
            continue
        assert (fisher.init_llm, fisher.fisher, fisher.export_fisher) == (
            chain.finetune_llm(m), prev.fisher(before), chain.fisher(m))
    deps = dependencies(ewc)
    assert "first/01-image/finetune" in deps["first/01-image/fisher"]
    assert "first/01-image/fisher" in deps["seq-ewc/02-video/finetune"]
    assert "seq-ewc/02-video/fisher" in deps["seq-ewc/03-audio/finetune"]

    # lwf: each finetune from stage 2 on distils from the one before; no Fisher anywhere.
    lwf_chain = layout.of_chain("seq-lwf")
    assert not any(s.phase == "fisher" for s in lwf)
    for i, m in enumerate(["video", "audio", "depth"], 2):
        ft = find_step(lwf, "finetune", m).spec
        prev = first if i == 2 else lwf_chain
        assert (ft.lwf, ft.fisher, ft.init_llm) == (True, None,
                                                    prev.finetune_llm(order[i - 2].name))
        assert ft.name == f"seq-lwf/0{i}-{m}/finetune"
        assert find_step(lwf, "evaluate", m).spec.llm == lwf_chain.finetune_llm(m)
    assert not find_step(seq, "finetune", "video").spec.lwf

    keys = {EVERY_METHOD[n].key for n in EVERY_METHOD}
    assert len(keys) == len({m.key for m in EVERY_METHOD.values()}) and \
        {"seq", "seq-ewc", "seq-lwf"} <= keys
    for bad in (dict(chain="merge", regularizer="ewc"), dict(chain="seq", regularizer="l2")):
        with pytest.raises(MeraError, match="regularizer .*one of ewc, lwf, on the seq chain"):
            Method(**bad)
    with pytest.raises(MeraError, match="no fisher step .*only the ewc method"):
        find_step(plan(cfg, Method.of(cfg), layout), "fisher", "image")


# --- runs ----------------------------------------------------------------------------------------

def test_a_two_stage_benchmark_of_ewc_and_lwf(tiny_config, tmp_path):
    """`mera bench mcl` of seq-ft, ewc and lwf over image then video in one process: each
    evaluates both stages; ewc's Fisher of theta_1 covers every tensor; ewc's finetune is
    penalised and stays closer to theta_1 than seq's in the Fisher's metric; lwf's first loss is
    seq's (its teacher is the student then) and it ends elsewhere."""
    cfg = small(tiny_config, steps=6, ewc_lambda=1e6)
    cfg["stages"]["eval"].update(max_samples=8, batch_size=8)
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "mera_ds", "bench", "mcl", "--config", str(path),
                           "--order", "image,video", "--out", str(out), "--methods",
                           "seq-ft,ewc,lwf"], cwd=ROOT, env=mera_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "mcl.json").read_text())
    for name in ("ewc", "lwf"):
        P = result["methods"][name]["P"]
        assert len(P) == 2 and P[0][1] is None and all(0 <= v <= 1 for v in P[1])
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    assert sorted(s for s in steps if "/finetune" in s or "/fisher" in s) == [
        "first/01-image/finetune", "first/01-image/fisher", "seq-ewc/02-video/finetune",
        "seq-lwf/02-video/finetune", "seq/02-video/finetune"]
    video = {k: steps[f"{k}/02-video/finetune"]["result"] for k in ("seq", "seq-ewc", "seq-lwf")}
    assert video["seq-ewc"]["ewc_penalty"] > 0 and "ewc_penalty" not in video["seq"]
    assert video["seq-lwf"]["first_loss"] == pytest.approx(video["seq"]["first_loss"], rel=1e-5)

    chains = out / "chains"
    theta1 = state(chains / "first/01-image/finetune/llm")
    fisher = state(chains / "first/01-image/finetune/fisher")
    assert set(fisher) == set(theta1) and all(f.min() >= 0 for f in fisher.values())
    assert sum(float(f.sum()) for f in fisher.values()) > 0

    def distance(chain):
        theta2 = state(chains / f"{chain}/02-video/finetune/llm")
        return sum(float((fisher[n] * (theta2[n] - theta1[n]) ** 2).sum()) for n in theta1)

    assert distance("seq-ewc") < 0.5 * distance("seq")
    lwf, seq = (state(chains / f"{c}/02-video/finetune/llm") for c in ("seq-lwf", "seq"))
    assert any(not torch.equal(lwf[n], seq[n]) for n in seq)


def _reference_finetune(run_cfg, spec, start: dict, ranks_batches: list, fisher: dict,
                        anchor: dict, lora: bool):
    """The finetune of `spec` in one process, plainly: the model as the job started (`start`,
    dist_job's full tensors), each step's loss the mean over the ranks' micro-batches plus EWC's
    penalty by autograd, clipping and AdamW as the job's. Returns the LLM as exported and the
    connector."""
    from mera_ds.model.llm import build_llm
    from mera_ds.model.lora import adapters, merged_tensors, with_lora
    from mera_ds.model.mllm import build_mllm, param_groups, set_trainable
    from mera_ds.train.recipe import lr_factor

    llm, tokenizer = build_llm(run_cfg.llm, path=spec.init_llm)
    if lora:
        llm = with_lora(llm, spec.lora)
    mllm = build_mllm(run_cfg, modalities=["video"], llm=llm, tokenizer=tokenizer)
    mllm.llm.load_state_dict({n[4:]: t for n, t in start.items() if n.startswith("llm.")})
    mllm.connectors.load_state_dict({n[len("connector."):]: t for n, t in start.items()
                                     if n.startswith("connector.")})
    set_trainable(mllm, llm=True, connectors=["video"])
    s = spec.settings
    groups = param_groups(mllm, lr_llm=spec.lr_llm, lr_connector=spec.lr_connector,
                          weight_decay=s.weight_decay)
    optimizer = torch.optim.AdamW(groups)
    initial = [g["lr"] for g in optimizer.param_groups]
    trained = [p for g in groups for p in g["params"]]

    def penalty():
        if lora:
            terms = [fisher[n] * (scaling * b @ a) ** 2
                     for n, (a, b, scaling) in adapters(mllm.llm).items()]
        else:
            terms = [fisher[n] * (p - anchor[n]) ** 2 for n, p in mllm.llm.named_parameters()]
        return s.ewc_lambda / 2 * sum(t.sum() for t in terms)

    mllm.train()
    for step in range(s.steps):
        for g, lr in zip(optimizer.param_groups, initial):
            g["lr"] = lr * lr_factor(step, s)
        optimizer.zero_grad()
        losses = [mllm(batches[step]).loss for batches in ranks_batches]
        (sum(losses) / len(losses) + penalty()).backward()
        torch.nn.utils.clip_grad_norm_(trained, s.grad_clip)
        optimizer.step()
    with torch.no_grad():
        exported = {n: (fold(*(p.data for p in ps)) if fold else ps[0].data)
                    for n, ps, fold in merged_tensors(mllm.llm)}
    return exported, {n: p.detach() for n, p in mllm.connectors["video"].named_parameters()}


@pytest.fixture(scope="module")
def stage1(builtin_shards, tmp_path_factory):
    """theta_1 and connector_1 of a short image finetune (in this process), then EWC's Fisher of
    it on 2 ranks under ZeRO-3: the config, its layout and the Fisher job's output dir."""
    from mera_ds.run.local import run_step

    from .conftest import default_config
    from .test_train import torchrun

    tmp = tmp_path_factory.mktemp("ewc2")
    cfg = small(default_config(builtin_shards, tmp / "run"), ewc_lambda=1e7)
    cfg["data"] = {"shuffle_buffer": 16}
    run_cfg = parse_config(cfg)
    steps = plan(run_cfg, EVERY_METHOD["ewc"], RunLayout.of(run_cfg), chained=True)
    with mock.patch.dict(os.environ):  # the job sets RANK etc.; not for the torchruns
        run_step(run_cfg, find_step(steps, "finetune", "image"), checkpoint_every=0)
    torchrun(cfg, "fisher", "image", tmp / "fisher", method="ewc")
    return {"cfg": cfg, "steps": steps, "tmp": tmp}


def test_fisher_on_two_ranks_is_the_one_process_fisher_of_their_batches(stage1, one_thread):
    """Each batch is both ranks' micro-batches, whose gradients ZeRO-3 averages: the Fisher the
    2 ranks write (each its partition, gathered) is what one process computes from the squared
    mean gradients of those batches (float32, up to reduction order: rtol 1e-4)."""
    from mera_ds.model.connectors import load_connector
    from mera_ds.model.llm import build_llm
    from mera_ds.model.mllm import build_mllm

    run_cfg = parse_config(stage1["cfg"])
    spec = find_step(stage1["steps"], "fisher", "image").spec
    metrics = json.loads((stage1["tmp"] / "fisher" / "metrics.json").read_text())
    assert metrics["batches"] == 2 and metrics["zero_stage"] == 3
    written = state(spec.export_fisher)
    mllm = build_mllm(run_cfg, ["image"], *build_llm(run_cfg.llm, path=spec.init_llm))
    load_connector(mllm.connectors["image"], spec.init_connectors["image"])
    mllm.eval()
    ranks = [batches_of(run_cfg, spec, mllm, r, 2) for r in (0, 1)]
    want = {n: torch.zeros_like(p) for n, p in mllm.llm.named_parameters()}
    for b in range(2):
        mllm.zero_grad()
        ((mllm(ranks[0][b]).loss + mllm(ranks[1][b]).loss) / 2).backward()
        for n, p in mllm.llm.named_parameters():
            want[n] += p.grad ** 2 / 2
    assert set(written) == set(want)
    for n, w in want.items():
        torch.testing.assert_close(written[n], w, rtol=1e-4, atol=1e-6 * float(w.max()))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_penalised_finetune_on_two_ranks_is_the_one_process_one(stage1, lora, one_thread):
    """Stage 2's EWC finetune on 2 ranks under ZeRO-3 (full, or LoRA from the same theta_1),
    each rank holding its partitions of F and W*: the LLM and connector it exports are those of
    the plain one-process finetune on the same batches with the penalty by autograd (float32,
    up to reduction order: rtol 1e-4, atol 1e-5)."""
    from .test_train import torchrun

    cfg = copy.deepcopy(stage1["cfg"])
    if lora:
        cfg["stages"]["finetune"].update(lora={"r": 4, "alpha": 8}, lr_llm=1e-2)
    run_cfg = parse_config(cfg)
    spec = find_step(plan(run_cfg, EVERY_METHOD["ewc"], RunLayout.of(run_cfg), chained=True),
                     "finetune", "video").spec
    out = stage1["tmp"] / f"video-{'lora' if lora else 'full'}"
    shutil.rmtree(os.path.dirname(spec.export_llm), ignore_errors=True)  # the other's
    torchrun(cfg, "finetune", "video", out, method="ewc")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ewc_penalty"] > 0 and metrics["zero_stage"] == 3
    exported = state(spec.export_llm)
    connector = load_file(spec.export_connectors["video"])
    fisher, anchor = state(spec.fisher), state(spec.init_llm)

    from mera_ds.model.mllm import build_mllm

    probe = build_mllm(run_cfg, modalities=["video"])
    ranks = [batches_of(run_cfg, spec, probe, r, 2) for r in (0, 1)]
    want, want_connector = _reference_finetune(
        run_cfg, spec, load_file(out / "start-full.safetensors"), ranks, fisher, anchor, lora)
    assert set(exported) == set(want)
    moved = 0
    for n, w in want.items():
        torch.testing.assert_close(exported[n], w, rtol=1e-4, atol=1e-5)
        moved += not torch.equal(w, anchor[n])
    assert moved == (14 if lora else len(anchor))
    for n, w in want_connector.items():
        torch.testing.assert_close(connector[n], w, rtol=1e-4, atol=1e-5)
