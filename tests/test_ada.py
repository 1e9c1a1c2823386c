"""The learned merge (mera-ada, strategy ada): the parametrized LLM is theta_0 + sum_k lambda_k T_k
and its coefficients get the gradient <dL/dW, T_k>; the ada merge is that formula; the plan fits
the coefficients in the realign before the merge; under ZeRO-3 every piece is partitioned and the
fitted coefficients equal the data-parallel realign's."""
import copy
import json
import os
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mera_ds.config import MergeConfig, parse_config
from mera_ds.errors import MeraError
from mera_ds.merge.engine import merge_llm
from mera_ds.run.layout import RunLayout
from mera_ds.run.plan import Method, find_step, plan
from mera_ds.run.schedule import dependencies
from mera_ds.train.recipe import run_job
from mera_ds.train.runtime import DirCheckpointer

from .conftest import Crash, crashing_checkpointer, run_in_process, two_modalities
from .test_merge import state, tiny_llama
from .test_train import torchrun


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """theta_0 and two finetuned LLMs with tied embeddings (one tensor in two modules)."""
    root = tmp_path_factory.mktemp("tied")
    return [str(tiny_llama(root / f"m{k}", seed=20 + k, tie=True)) for k in range(3)]


def formula(base: str, finetuned: list, lambdas: dict) -> dict:
    """theta_0 + sum_k lambda_{t,k} (ft_k - theta_0) in float64, from the files."""
    b, fts = state(base), [state(f) for f in finetuned]
    return {n: sum(lam * (f[n].double() - b[n].double()) for lam, f in zip(lambdas[n], fts))
            + b[n].double() for n in b}


def test_the_parametrized_llm_is_the_merge_and_its_coefficients_get_the_gradient(tied):
    from transformers import AutoModelForCausalLM

    from mera_ds.model.ada import coefficients, read_coefficients, with_learned_merge

    base, *fts = tied
    llm = with_learned_merge(AutoModelForCausalLM.from_pretrained(base), fts)
    lams = coefficients(llm)
    llm.requires_grad_(False)  # as the realign trains it: the coefficients alone
    for lam in lams.values():
        lam.requires_grad_(True)
    assert set(lams) == set(state(base))  # every tensor once, the tied one under its first name
    assert all(torch.equal(lam, torch.tensor([0.5, 0.5])) for lam in lams.values())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lam in lams.values():
            lam.copy_(torch.rand(2, generator=g) * 2 - 0.5)
    fitted = read_coefficients(llm)
    expected = formula(base, fts, fitted)

    # The merged model (a plain one holding the formula's weights) computes the same loss.
    plain = AutoModelForCausalLM.from_pretrained(base)
    plain.load_state_dict({n: t.float() for n, t in expected.items()}, strict=False)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    ids = torch.randint(0, 96, (2, 12), generator=g)
    loss = llm(input_ids=ids, labels=ids).loss
    plain_loss = plain(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(llm.lm_head.weight, expected["model.embed_tokens.weight"].float())

    # d loss / d lambda_{t,k} = <d loss / d W_t, T_k,t>; only the coefficients get gradients.
    loss.backward()
    plain_loss.backward()
    b, ft = state(base), [state(f) for f in fts]
    grads = dict(plain.named_parameters())
    for name, lam in lams.items():
        want = [(grads[name].grad * (f[name] - b[name])).sum() for f in ft]
        torch.testing.assert_close(lam.grad, torch.stack(want), rtol=1e-4, atol=1e-7)
    assert [n for n, p in llm.named_parameters() if p.grad is not None] == [
        n for n in dict(llm.named_parameters()) if n.endswith(".lam")]


def test_the_ada_merge_is_the_formula(tied, tmp_path):
    base, *fts = tied
    g = np.random.default_rng(1)
    lambdas = {n: [float(x) for x in g.uniform(-0.5, 1.5, 2)] for n in state(base)}
    (tmp_path / "c.json").write_text(json.dumps(lambdas))
    cfg = MergeConfig(strategy="ada", coefficients=str(tmp_path / "c.json"))
    merge_llm(base, fts, str(tmp_path / "out"), cfg, step=2)
    merged = state(tmp_path / "out")
    for name, want in formula(base, fts, lambdas).items():
        torch.testing.assert_close(merged[name].double(), want, rtol=1e-6, atol=1e-7)


def test_bad_coefficients_are_named_and_nothing_is_written(tied, tmp_path):
    base, *fts = tied
    names = sorted(state(base))
    one_short = {**{n: [0.5, 0.5] for n in names}, names[1]: [0.5]}
    for bad, why in (({}, "tensor '.*' needs 2 numbers .* got None"),
                     (one_short, f"tensor '{names[1]}' needs 2 numbers .* got \\[0.5\\]"),
                     ([1, 2], "not a JSON object")):
        path = tmp_path / "c.json"
        path.write_text(json.dumps(bad))
        cfg = MergeConfig(strategy="ada", coefficients=str(path))
        with pytest.raises(MeraError, match=f"{path}: .*{why}"):
            merge_llm(base, fts, str(tmp_path / "out"), cfg, step=2)
        assert not os.path.exists(tmp_path / "out")
    with pytest.raises(MeraError, match="needs the coefficients file"):
        merge_llm(base, fts, str(tmp_path / "out"), MergeConfig(strategy="ada"), step=2)


def ada_config(cfg: dict) -> dict:
    cfg["stages"]["merge"].update(strategy="ada", across_stages=True)
    return cfg


def test_the_plan_fits_the_coefficients_before_it_merges(tiny_config):
    cfg = parse_config(ada_config(tiny_config))
    layout = RunLayout.of(cfg)
    steps = plan(cfg, Method.of(cfg), layout)
    assert [s.phase for s in steps if s.modality == "video"] == [
        "replay", "finetune", "realign", "merge", "evaluate"]
    by_name = {s.name: s for s in steps}
    realign, merge = by_name["02-video/realign"].spec, by_name["02-video/merge"].spec
    finetuned = (layout.finetune_llm("image"), layout.finetune_llm("video"))
    assert realign.init_llm == layout.base_llm and realign.merge_finetuned == finetuned
    assert realign.lr_merge == cfg.stages.merge.ada_lr
    assert realign.export_coefficients == merge.coefficients == layout.merge_coefficients(
        "video")
    assert merge.prev == layout.base_llm and merge.finetuned == finetuned
    deps = dependencies(steps)
    assert "02-video/realign" in deps["02-video/merge"]
    assert "02-video/merge" in deps["02-video/evaluate"] and \
        "02-video/merge" in deps["03-audio/finetune"]
    # Stage 1 merges nothing, and realigns nothing.
    assert [s.phase for s in steps if s.modality == "image"] == [
        "base", "replay", "finetune", "evaluate"]

    for section, field in (("merge", "across_stages"), ("realign", "enabled")):
        bad = copy.deepcopy(tiny_config)
        bad["stages"][section][field] = False
        with pytest.raises(MeraError, match="stages.merge.strategy ada: its coefficients are "
                                            "fitted by the realign"):
            parse_config(bad)


def test_a_learned_merge_run_and_its_realign_under_zero3(tiny_config, tmp_path):
    """A two-stage run in one process writes the coefficients and merges with them (the
    formula); stage 2's realign again on 2 ranks, data-parallel and ZeRO-3: every piece of the
    parametrized LLM partitioned, the same coefficients, the LLM directories untouched."""
    cfg = ada_config(two_modalities(tiny_config))
    run_in_process(cfg, tmp_path)
    layout = RunLayout.of(parse_config(cfg))
    fitted = json.loads(open(layout.merge_coefficients("video")).read())
    assert all(lam != [0.5, 0.5] for lam in fitted.values())  # they trained
    finetuned = [layout.finetune_llm("image"), layout.finetune_llm("video")]
    merged = state(layout.merge_llm("video"))
    for name, want in formula(layout.base_llm, finetuned, fitted).items():
        torch.testing.assert_close(merged[name].double(), want, rtol=1e-5, atol=1e-6)

    # Killed after its step-2 checkpoint and resumed, the realign fits the same coefficients.
    parsed = parse_config(cfg)
    spec = find_step(plan(parsed, Method.of(parsed), layout), "realign", "video").spec
    with mock.patch.dict(os.environ):  # the job sets RANK etc.; not for the torchruns below
        with pytest.raises(Crash):
            run_job(parsed, spec, crashing_checkpointer(str(tmp_path / "state")), 2)
        assert run_job(parsed, spec, DirCheckpointer(str(tmp_path / "state")),
                       2)["resumed_at"] == 2
    resumed = json.loads(open(layout.merge_coefficients("video")).read())
    for name, lam in fitted.items():
        np.testing.assert_allclose(resumed[name], lam, rtol=1e-4, atol=1e-6)

    llms = [layout.base_llm, *finetuned]
    before = {(d, f): open(os.path.join(d, f), "rb").read() for d in llms for f in os.listdir(d)}
    runs = {}
    for mode in ("data_parallel", "zero3"):
        cfg["stages"]["realign"]["mode"] = mode
        torchrun(cfg, "realign", "video", tmp_path / mode)
        metrics = json.loads((tmp_path / mode / "metrics.json").read_text())
        assert metrics["zero_stage"] == (3 if mode == "zero3" else 0)
        runs[mode] = (json.loads(open(layout.merge_coefficients("video")).read()),
                      {m: load_file(layout.realign_connector("video", m))
                       for m in ("image", "video")})
    (zero3, zero3_connectors), (replicated, connectors) = runs["zero3"], runs["data_parallel"]
    for name, lam in zero3.items():
        np.testing.assert_allclose(lam, replicated[name], rtol=1e-4, atol=1e-6)
    for m, tensors in zero3_connectors.items():
        for k, v in tensors.items():
            torch.testing.assert_close(v, connectors[m][k], rtol=1e-4, atol=1e-6)
    parts = [load_file(tmp_path / "zero3" / f"start-partition-rank{r}.safetensors")
             for r in (0, 1)]
    full = state(layout.base_llm)
    for name, tensor in full.items():
        module, attr = name.rsplit(".", 1)
        for piece, numel in ((f"{module}.parametrizations.{attr}.original", tensor.numel()),
                             (f"{module}.parametrizations.{attr}.0.task_vectors",
                              2 * tensor.numel())):
            assert [p[piece].numel() for p in parts] == [(numel + 1) // 2] * 2, piece
    assert before == {(d, f): open(os.path.join(d, f), "rb").read()
                      for d in llms for f in os.listdir(d)}
