"""Evaluation: the performance matrix and BRG, and evaluate() on the tiny model with the metric
each task's config names (the metrics themselves: test_metrics.py)."""
import pytest
import torch

from mera_ds.config import parse_config
from mera_ds.data.loader import read_samples
from mera_ds.errors import MeraError
from mera_ds.evaluate import backward_relative_gain, evaluate, performance_matrix
from mera_ds.metrics import METRICS
from mera_ds.model.connectors import save_connector
from mera_ds.model.llm import build_llm
from mera_ds.model.mllm import build_mllm


pytestmark = pytest.mark.usefixtures("one_thread")


def test_performance_matrix_and_brg():
    rows = [{"modality": "image", "scores": {"image": 0.8}},
            {"modality": "video", "scores": {"image": 0.6, "video": 0.5}},
            {"modality": "audio", "scores": {"image": 0.4, "video": 0.45, "audio": 0.9}}]
    order, P = performance_matrix(rows)
    assert order == ["image", "video", "audio"]
    assert P == [[0.8, None, None], [0.6, 0.5, None], [0.4, 0.45, 0.9]]
    assert backward_relative_gain(P, order) == pytest.approx((0.4 / 0.8 + 0.45 / 0.5) / 2 * 100)
    # After stage 2 only.
    o2, P2 = performance_matrix(rows[:2])
    assert backward_relative_gain(P2, o2) == pytest.approx(0.6 / 0.8 * 100)
    # One stage: nothing learned before it.
    o1, P1 = performance_matrix(rows[:1])
    assert backward_relative_gain(P1, o1) is None
    # A modality that scored 0 after its own stage is left out of the mean, not a crash.
    P[0][0] = 0.0
    assert backward_relative_gain(P, order) == pytest.approx(0.45 / 0.5 * 100)
    P[1][1] = 0.0
    assert backward_relative_gain(P, order) is None
    # A stage row without a learned modality's score is an error naming it.
    with pytest.raises(MeraError, match="image"):
        performance_matrix([rows[0], {"modality": "video", "scores": {"video": 0.5}}])


@pytest.fixture
def stage_inputs(tiny_config, tmp_path):
    """(cfg, llm_dir, connectors) of stage 2 (video): the tiny LLM saved as an HF directory and
    the image and video connectors as safetensors files."""
    tiny_config["stages"]["eval"] = {"batch_size": 16}  # 40 samples: two full batches and a part
    cfg = parse_config(tiny_config)
    llm, tokenizer = build_llm(cfg.llm)
    llm_dir = str(tmp_path / "llm")
    llm.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    mllm = build_mllm(cfg, ["image", "video"], llm=llm, tokenizer=tokenizer)
    connectors = {}
    for name in ("image", "video"):
        connectors[name] = str(tmp_path / "connectors" / f"{name}.safetensors")
        save_connector(mllm.connectors[name], connectors[name])
    return cfg, llm_dir, connectors


def test_evaluate_tiny_model(stage_inputs):
    cfg, llm_dir, connectors = stage_inputs
    result = evaluate(cfg, "video", llm_dir=llm_dir, connectors=connectors)
    assert result["modality"] == "video"
    assert set(result["scores"]) == {"image", "video"}
    assert all(0.0 <= s <= 1.0 for s in result["scores"].values())
    assert result["samples"] == {"image": 40, "video": 40}
    for name, examples in result["examples"].items():
        assert len(examples) == 3
        for key, prediction, answer in examples:
            assert key.startswith(f"{name}-eval-")
            # Generation from inputs_embeds gives the new tokens only (words, at most
            # max_new_tokens of them), not the prompt.
            assert len(prediction.split()) <= cfg.modality(name).task.max_new_tokens


def test_evaluate_scores_a_constant_answer(stage_inputs, monkeypatch):
    """An LLM that always answers " Left " (any case, padded with whitespace) scores the share
    of "left" among each modality's answers: the metric is checked end to end, through
    MLLM.generate's decoding."""
    cfg, llm_dir, connectors = stage_inputs
    llm, tokenizer = build_llm(cfg.llm, path=llm_dir)
    word = tokenizer.convert_tokens_to_ids("left")
    assert word != tokenizer.unk_token_id

    def generate(self, inputs_embeds=None, **kwargs):
        return torch.tensor([[word, tokenizer.eos_token_id]] * inputs_embeds.shape[0])

    monkeypatch.setattr(type(llm), "generate", generate)
    limit = 25
    cfg.stages.eval.max_samples = limit
    result = evaluate(cfg, "video", llm_dir=llm_dir, connectors=connectors)
    assert result["samples"] == {"image": limit, "video": limit}
    for name in ("image", "video"):
        answers = [s["answer"] for s in read_samples(cfg.modality(name).eval_shards, limit=limit)]
        assert result["scores"][name] == pytest.approx(answers.count("left") / limit)
        assert all(p == "left" for _, p, _ in result["examples"][name])
    assert result["scores"]["image"] == 0.0 and result["scores"]["video"] > 0.0


def test_evaluate_scores_each_task_with_its_metric(stage_inputs, monkeypatch):
    """The metric a task's config names scores its predictions and answers."""
    cfg, llm_dir, connectors = stage_inputs
    seen = {}

    def metric(name):
        def score(predictions, answers):
            seen[name] = (list(predictions), list(answers))
            return 0.25 if name == "token_f1" else 0.75
        return score

    for name in ("token_f1", "bleu"):
        monkeypatch.setitem(METRICS, name, metric(name))
    cfg.modality("image").task.metric = "token_f1"
    cfg.modality("video").task.metric = "bleu"
    cfg.stages.eval.max_samples = 5
    result = evaluate(cfg, "video", llm_dir=llm_dir, connectors=connectors)
    assert result["scores"] == {"image": 0.25, "video": 0.75}
    for name, modality in (("token_f1", "image"), ("bleu", "video")):
        predictions, answers = seen[name]
        assert answers == [s["answer"] for s in read_samples(cfg.modality(modality).eval_shards,
                                                               limit=5)]
        assert [[p, a] for _, p, a in result["examples"][modality]] == \
            [list(pair) for pair in zip(predictions, answers)][:3]


def test_evaluate_needs_the_learned_connectors(stage_inputs):
    cfg, llm_dir, connectors = stage_inputs
    with pytest.raises(MeraError, match="learned"):
        evaluate(cfg, "video", llm_dir=llm_dir, connectors={"video": connectors["video"]})
    with pytest.raises(MeraError, match="no such connector"):
        evaluate(cfg, "video", llm_dir=llm_dir,
                 connectors={**connectors, "image": connectors["image"] + ".missing"})


def test_brg_interval_resamples_each_modality_paired():
    from mera_ds.evaluate import brg_interval

    own = [1.0] * 80 + [0.0] * 20
    rows = [{"modality": "image", "scores": {"image": 0.8}, "sample_scores": {"image": own}},
            {"modality": "video", "scores": {"image": 0.8, "video": 0.5},
             "sample_scores": {"image": own, "video": [0.5] * 10}}]
    # the same samples right after their stage and at the end: every resample gives 100%
    assert brg_interval(rows) == (pytest.approx(100.0), pytest.approx(100.0))
    # half of the samples right at the end lost: about 50%, an interval around it
    rows[1]["sample_scores"]["image"] = [1.0] * 40 + [0.0] * 60
    rows[1]["sample_scores"]["image"][:40] = own[:40]
    low, high = brg_interval(rows)
    assert low < 50.0 < high and high - low < 30
    # a metric without per-sample scores (bleu), or one stage: no interval
    assert brg_interval(rows[:1]) is None
    del rows[1]["sample_scores"]["image"]
    assert brg_interval(rows) is None
