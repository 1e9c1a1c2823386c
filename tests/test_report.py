"""`mera report RUN`: P, per-stage averages, BRG and loss curves from a hand-built run directory."""
import json
import os

import pytest
from PIL import Image

from mera_ds.cli import main
from mera_ds.errors import MeraError
from mera_ds.run.report import build_report, format_matrix, write_report
from mera_ds.storage import read_json

SCORES = {  # stage -> scores after it
    "image": {"image": 0.8},
    "video": {"image": 0.6, "video": 0.5},
    "audio": {"image": 0.4, "video": 0.45, "audio": 0.9},
}
P = [[0.8, None, None], [0.6, 0.5, None], [0.4, 0.45, 0.9]]
AVERAGES = [0.8, (0.6 + 0.5) / 2, (0.4 + 0.45 + 0.9) / 3]
BRG = (0.4 / 0.8 + 0.45 / 0.5) / 2 * 100
LOSSES = {"01-image-finetune": [3.0, 2.0, 1.5], "01-image-realign": [1.2, 1.0],
          "02-video-finetune": [2.5, 1.8], "02-video-realign": [1.1, 0.9],
          "03-audio-finetune": [2.2, 1.4], "03-audio-realign": [1.0, 0.7]}


def make_run(root, stages=("image", "video", "audio"), evaluated=None):
    """A run directory as a run leaves it: manifest, stage dirs, metrics.json, TensorBoard logs."""
    from torch.utils.tensorboard import SummaryWriter

    evaluated = stages if evaluated is None else evaluated
    root.mkdir(parents=True)
    (root / "manifest.json").write_text(json.dumps(
        {"version": 2, "order": list(stages), "method": "mera", "config": {}, "steps": {}}))
    for k, modality in enumerate(stages, 1):
        stage = root / "stages" / f"{k:02d}-{modality}"
        (stage / "finetune").mkdir(parents=True)
        if modality in evaluated:
            learned = stages[:k]
            metrics = {"modality": modality, "scores": {m: SCORES[modality][m] for m in learned},
                       "samples": {m: 20 for m in learned},
                       "examples": {m: [[f"{m}-eval-000000", "left", "left"],
                                        [f"{m}-eval-000001", "up", "down"]] for m in learned}}
            (stage / "eval").mkdir()
            (stage / "eval" / "metrics.json").write_text(json.dumps(metrics))
    (root / "stages" / ".02-video.tmp-1234").mkdir()  # an uncommitted temporary: not a stage
    for job, values in LOSSES.items():
        if job.split("-")[1] in stages:
            writer = SummaryWriter(str(root / "tensorboard" / job))
            for step, v in enumerate(values):
                writer.add_scalar("loss", v, step)
                writer.add_scalar("tokens_per_s", 100.0, step)
            writer.close()
    return str(root)


def assert_png(path):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
        im.verify()


def test_report_numbers_files_and_markdown(tmp_path):
    run = make_run(tmp_path / "run")
    report = build_report(run)
    assert report["order"] == ["image", "video", "audio"]
    assert [s["stage"] for s in report["stages"]] == ["01-image", "02-video", "03-audio"]

    path = write_report(run, report)
    assert path == os.path.join(run, "report", "report.md")
    saved = read_json(os.path.join(run, "report", "report.json"))
    for r in (report, saved):
        assert r["P"] == P
        assert r["averages"] == pytest.approx(AVERAGES)
        assert r["brg"] == pytest.approx(BRG)
        assert list(r["losses"]) == list(LOSSES)  # jobs in run order
        for job, values in LOSSES.items():
            assert [s for s, _ in r["losses"][job]] == list(range(len(values)))
            assert [v for _, v in r["losses"][job]] == pytest.approx(values)

    md = open(path).read()
    assert "| after stage | image | video | audio | average |" in md
    assert "| 2: video | 0.600 | 0.500 |  | 0.550 |" in md
    assert "BRG = mean over i < T of P[T][i] / P[i][i] * 100" in md
    assert f"BRG after 3 evaluated stages: {BRG:.2f}%" in md
    assert "| video | 20 | video-eval-000001 | up | down | no |" in md
    assert_png(os.path.join(run, "report", "performance_matrix.png"))
    assert_png(os.path.join(run, "report", "loss_curves.png"))


def test_format_matrix():
    text = format_matrix(["image", "video"], [[0.8, None], [0.6, 0.5]])
    assert text.splitlines()[1:] == [f"{'':<10}{'image':>9}{'video':>9}",
                                     f"{'image':<10}{0.8:9.3f}{'':>9}",
                                     f"{'video':<10}{0.6:9.3f}{0.5:9.3f}"]


def test_cli_prints_matrix_averages_brg(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    assert main(["report", run]) == 0
    out = capsys.readouterr().out
    assert "performance matrix P" in out
    assert f"{'audio':<10}{0.4:9.3f}{0.45:9.3f}{0.9:9.3f}" in out
    assert f" 2 video     {AVERAGES[1]:9.3f}" in out
    assert f"BRG after 3 evaluated stages: {BRG:.2f}%" in out
    assert out.rstrip().endswith(os.path.join(run, "report", "report.md"))


def test_stage_without_metrics_is_not_evaluated(tmp_path, capsys):
    run = make_run(tmp_path / "run", stages=("image", "video", "audio"),
                   evaluated=("image", "video"))
    report = build_report(run)
    assert [s["evaluated"] for s in report["stages"]] == [True, True, False]
    assert report["P"] == [[0.8, None], [0.6, 0.5]]
    assert report["brg"] == pytest.approx(0.6 / 0.8 * 100)
    assert main(["report", run]) == 0
    out = capsys.readouterr().out
    assert "not evaluated (no eval/metrics.json): 03-audio" in out
    assert "| 03-audio | audio | not evaluated |" in open(os.path.join(run, "report",
                                                                       "report.md")).read()


def test_nothing_evaluated_still_reports(tmp_path):
    run = make_run(tmp_path / "run", stages=("image",), evaluated=())
    report = build_report(run)
    assert report["P"] == [] and report["brg"] is None
    write_report(run, report)
    assert_png(os.path.join(run, "report", "performance_matrix.png"))


def test_missing_run_or_no_stages_is_one_line_error(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    with pytest.raises(MeraError, match="nope: no such run directory"):
        build_report(missing)
    assert main(["report", missing]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and missing in err
    (tmp_path / "empty").mkdir()
    with pytest.raises(MeraError, match="empty: no manifest.json; not a run directory"):
        build_report(str(tmp_path / "empty"))


def test_metrics_of_another_stage_is_an_error(tmp_path):
    run = make_run(tmp_path / "run", stages=("image",))
    (tmp_path / "run" / "stages" / "01-image" / "eval" / "metrics.json").write_text(
        json.dumps({"modality": "video", "scores": {"video": 1.0}}))
    with pytest.raises(MeraError, match="01-image/eval/metrics.json: modality 'video', its stage "
                                        "is 01-image"):
        build_report(run)


def test_s3_run_dir(tmp_path, s3_bucket):
    import fsspec

    local = make_run(tmp_path / "run")
    run = f"{s3_bucket}/runs/a"
    fs = fsspec.filesystem("s3")
    fs.put(local, run.removeprefix("s3://"), recursive=True)
    path = write_report(run)
    assert path == f"{run}/report/report.md"
    saved = json.loads(fs.cat_file(f"{run}/report/report.json"))
    assert saved["P"] == P and saved["brg"] == pytest.approx(BRG)
    assert list(saved["losses"]) == list(LOSSES)
    out = tmp_path / "heatmap.png"
    out.write_bytes(fs.cat_file(f"{run}/report/performance_matrix.png"))
    assert_png(out)
