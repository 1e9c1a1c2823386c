"""Merges across stages (stages.merge.across_stages, the mera-<strategy> benchmark methods): the
stage-i merge combines theta_0 and theta_ft_1..theta_ft_i; mera over them is the paper's
recursion; PCB-Merging against its paper's formulas; the plan's base and merge steps; a whole
run in one process."""
import json
import os

import numpy as np
import pytest
import torch

from mera_ds.config import MergeConfig, parse_config
from mera_ds.merge.engine import merge_llm
from mera_ds.run.layout import RunLayout
from mera_ds.run.plan import Method, plan
from mera_ds.run.schedule import dependencies

from .conftest import run_in_process, two_modalities
from .test_merge import f32, state, tiny_llama


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """theta_0 and three finetuned LLMs."""
    root = tmp_path_factory.mktemp("stages")
    return [tiny_llama(root / f"m{k}", seed=10 + k) for k in range(4)]


def test_mera_across_stages_is_the_recursion(stages, tmp_path):
    """theta_0 + (1/3) sum_k (ft_k - theta_0) = the recursion theta_i = theta_{i-1} +
    (ft_i - theta_{i-1}) / i from theta_1 = ft_1, to float32 rounding."""
    base, ft1, ft2, ft3 = stages
    cfg = MergeConfig(strategy="mera")
    merge_llm(ft1, [ft2], str(tmp_path / "theta2"), cfg, step=2)
    merge_llm(str(tmp_path / "theta2"), [ft3], str(tmp_path / "theta3"), cfg, step=3)
    merge_llm(base, [ft1, ft2, ft3], str(tmp_path / "across"), cfg, step=3)
    recursion, across = state(tmp_path / "theta3"), state(tmp_path / "across")
    fts = [f32(p) for p in (ft1, ft2, ft3)]
    for name, got in across.items():
        torch.testing.assert_close(got, recursion[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, sum(f[name] for f in fts) / 3, rtol=1e-5, atol=1e-6)


def test_mera_takes_one_finetuned_llm_or_one_per_stage(stages, tmp_path):
    from mera_ds.errors import MeraError

    with pytest.raises(MeraError, match="takes one fine-tuned LLM .* or i of them .* got 2 at "
                                        "step 3"):
        merge_llm(stages[0], stages[1:3], str(tmp_path / "out"), MergeConfig(strategy="mera"),
                  step=3)


def pcb_reference(base: np.ndarray, fts: list, density: float, lam: float) -> np.ndarray:
    """PCB-Merging (Du et al., NeurIPS 2024, Alg. 1, with the authors' outlier clamp), written
    with numpy's sort: intra-balancing exp(n * norm(|d|)^2), inter-balancing tanh(d * sum d),
    the top `density` of each score kept, a weighted mean of the clamped deltas."""
    d = np.stack([(f - base).ravel() for f in fts]).astype(np.float64)
    n, size = d.shape

    def clamp(x, low, high):
        s = np.sort(x, axis=1)
        return np.clip(x, s[:, [int(size * low)]], s[:, [int(size * (1 - high)) - 1]])

    def norm(x):
        lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
        return (x - lo) / np.where(hi > lo, hi - lo, 1)

    magnitude = clamp(np.abs(d), 1e-4, 1e-4)
    score = np.exp(n * norm(magnitude) ** 2) * np.tanh(d * d.sum(0))
    weight = norm(clamp(score, 1 - density, 0))
    merged = (np.sign(d) * magnitude * weight).sum(0) / np.maximum(weight.sum(0), 1e-12)
    return base + lam * merged.reshape(base.shape)


def test_pcb_is_the_papers_formula(stages, tmp_path):
    merge_llm(stages[0], stages[1:], str(tmp_path / "out"),
              MergeConfig(strategy="pcb", density=0.25, lam=0.9))
    base, *fts = (f32(m) for m in stages)
    merged = state(tmp_path / "out")
    for name, got in merged.items():
        want = pcb_reference(base[name].double().numpy(),
                             [f[name].double().numpy() for f in fts], 0.25, 0.9)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-6, err_msg=name)
    # Three quarters of each delta's elements get weight 0: where all three do, the base stays.
    emb = "model.embed_tokens.weight"
    assert 0.2 < (merged[emb] == base[emb]).float().mean() < 0.6


def across_config(tiny_config, strategy: str) -> dict:
    cfg = two_modalities(tiny_config)
    cfg["modalities"].append(dict(cfg["modalities"][0], name="image2"))
    cfg["stages"]["merge"].update(strategy=strategy, across_stages=True)
    return cfg


def test_the_plan_writes_theta_0_once_and_merges_every_stage_against_it(tiny_config):
    cfg = parse_config(across_config(tiny_config, "ties"))
    layout = RunLayout.of(cfg)
    steps = {s.name: s for s in plan(cfg, Method.of(cfg), layout)}
    assert [n for n in steps if n.endswith("/base")] == ["01-image/base"]
    merge = steps["03-image2/merge"].spec
    assert merge.prev == layout.base_llm and merge.strategy == "ties"
    assert merge.finetuned == tuple(layout.finetune_llm(m) for m in ("image", "video", "image2"))
    assert dependencies(list(steps.values()))["03-image2/merge"] == {
        "01-image/base", "01-image/finetune", "02-video/finetune", "03-image2/finetune"}
    # Stage 3 finetunes from the merge of stage 2, as in the paper's recursion.
    assert steps["03-image2/finetune"].spec.init_llm == layout.merge_llm("video")


def test_a_run_merging_across_stages_with_ties(tiny_config, tmp_path):
    """In one process: theta_0 written, stage 2 merged with TIES over (ft_1, ft_2) against it,
    exactly as `mera merge` computes it from those directories."""
    cfg = two_modalities(tiny_config)
    cfg["stages"]["merge"].update(strategy="ties", across_stages=True, density=0.5)
    cfg["stages"]["realign"]["enabled"] = False
    run_in_process(cfg, tmp_path)
    layout = RunLayout.of(parse_config(cfg))
    steps = json.loads(open(layout.manifest).read())["steps"]
    assert steps["01-image/base"]["result"]["parameters"] > 0
    again = tmp_path / "again"
    merge_llm(layout.base_llm, [layout.finetune_llm("image"), layout.finetune_llm("video")],
              str(again), MergeConfig(strategy="ties", density=0.5), step=2)
    run = state(layout.merge_llm("video"))
    assert set(run) == set(state(layout.base_llm))
    for name, tensor in state(again).items():
        assert torch.equal(run[name], tensor), name
    assert os.path.exists(layout.eval_metrics("video"))


def test_across_stages_the_summing_strategies_scale_the_average(tiny_config):
    """dare and task_arithmetic sum the task vectors: across stages lam / i keeps lam the scale
    of their average; the averaging strategies keep the config's lam."""
    for strategy, lam in (("dare", 0.8 / 3), ("task_arithmetic", 0.8 / 3), ("ties", None)):
        cfg = across_config(tiny_config, strategy)
        cfg["stages"]["merge"]["lam"] = 0.8
        cfg = parse_config(cfg)
        merge = next(s for s in plan(cfg, Method.of(cfg), RunLayout.of(cfg))
                     if s.name == "03-image2/merge")
        assert merge.spec.lam == lam, strategy
