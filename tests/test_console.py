"""What a person sees of a run: a bar or plain progress line per running step, one line per
finished step, warnings and errors in one line naming their log file; Ray's, DeepSpeed's and the
workers' logs in RUN/logs/ (mera_ds.run.console). -v shows everything on the console as before."""
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import yaml

from mera_ds.run import console
from mera_ds.run.console import PlainProgress, captured
from mera_ds.run.layout import RunLayout

from .conftest import ROOT, default_config, mera_env, two_modalities

# What Ray and DeepSpeed print on a console left to them (`mera -v`).
NOISE = re.compile(r"pid=\d+\)|Failed to query|Reporting training result|TrainController|"
                   r"RayTrainWorker|Started a local Ray|DeepSpeed|\[INFO|core_worker|"
                   r"Loading weights|Checkpoint successfully")
SUMMARY = r"^{}: .+ in \d\d:\d\d$"  # a step's line on the console


def mera(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "mera_ds", *args], cwd=ROOT, env=mera_env(),
                          capture_output=True, text=True, timeout=timeout)


# --- units ---------------------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_plain_progress_prints_each_tenth_of_the_steps_when_fast():
    clock = Clock()
    progress = PlainProgress("01-image/finetune", 300, 0, clock=clock)
    lines = {}
    for step in range(1, 301):
        clock.t += 0.1
        loss = 5.0 - step / 100 if step % 15 == 0 else None
        line = progress.update(step, loss, 1000.0 if loss else None)
        if line:
            lines[step] = line
    assert list(lines) == list(range(30, 301, 30))
    assert lines[30] == "01-image/finetune step 30/300 loss 4.7000 1000 tok/s eta 00:27"
    assert lines[300].endswith("step 300/300 loss 2.0000 1000 tok/s")  # done: no eta


def test_plain_progress_prints_every_30_s_when_slow_and_not_when_stalled():
    clock = Clock()
    progress = PlainProgress("02-video/realign", 1000, 100, clock=clock)  # resumed at 100
    printed = []
    for step in range(101, 119):
        clock.t += 12.0
        if progress.update(step):
            printed.append(step)
    assert printed == [103, 106, 109, 112, 115, 118]  # 36 s apart: the first past 30 s
    clock.t += 300.0  # no step for 5 minutes: no line (nothing new to say)
    assert progress.update(118) is None
    assert progress.update(119) == "02-video/realign step 119/1000 eta 6:38:46"  # 881 steps at 27 s


def test_a_restarted_job_resumes_its_bar_and_says_so(monkeypatch, caplog):
    """Progress events of a job that restarts from a checkpoint (a call at a step already
    passed) start its progress again, with one line saying where; events of another step than
    the running one are dropped."""
    c = console.Console(verbose=False)
    monkeypatch.setattr(console, "_console", c)
    with caplog.at_level(logging.INFO, logger="mera_ds.console"), c.running("01-image/finetune"):
        for step in range(0, 31):
            c.update("01-image/finetune", step, 30, 1.0, 100.0)
        c.update("01-image/realign", 5, 30)
        c.update("01-image/finetune", 10, 30)
        c.update("01-image/finetune", 11, 30, 0.5, 90.0)
        assert c.progress().args == ("01-image/finetune",)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:2] == ["01-image/finetune step 3/30 loss 1.0000 100 tok/s eta 00:00",
                         "01-image/finetune step 6/30 loss 1.0000 100 tok/s eta 00:00"]
    assert lines[9] == "01-image/finetune step 30/30 loss 1.0000 100 tok/s"
    assert lines[10:] == ["01-image/finetune: resuming at step 10 of 30"]
    assert not any("realign" in line for line in lines)
    assert c.progress() is None  # no step running


def test_captured_takes_descriptors_logging_and_forwards_what_surfaces(tmp_path):
    path = str(tmp_path / "logs" / "01-image-finetune" / "rank-1.log")
    forwarded = []
    log = logging.getLogger("mera_ds.test")
    with pytest.raises(ValueError):
        with captured(path, lambda level, message: forwarded.append((level, message))):
            os.write(1, b"printed\n")  # as C code or a subprocess would
            os.write(2, b"from C\n")
            log.info("an info line")
            log.warning("a warning\nwith a second line")
            logging.getLogger("deepspeed").warning("not ours")
            raise ValueError("the end")
    text = open(path).read()
    for line in ("printed", "from C", "INFO mera_ds.test: an info line",
                 "WARNING mera_ds.test: a warning", "ValueError: the end"):
        assert line in text, text
    assert forwarded == [("WARNING", "a warning")]
    os.write(1, b"after\n")  # the descriptors are back
    assert "after" not in open(path).read()


# --- whole runs ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_run(builtin_shards, tmp_path_factory):
    """A two-modality run of tiny steps on a local Ray, its console captured (not a terminal)."""
    tmp = tmp_path_factory.mktemp("console")
    cfg = two_modalities(default_config(builtin_shards, tmp / "run"))
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = mera("run", str(path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return {"cfg": cfg, "path": path, "tmp": tmp, "stderr": proc.stderr, "out": out,
            "layout": RunLayout(str(tmp / "run"), ("image", "video"))}


def test_the_console_shows_steps_not_logs(ray_run):
    err, layout = ray_run["stderr"], ray_run["layout"]
    steps = json.loads(open(layout.manifest).read())["steps"]
    assert len(steps) == 8  # replay, finetune, evaluate; and merge, realign at stage 2
    lines = err.splitlines()
    noise = [line for line in lines if NOISE.search(line)]
    assert not noise, noise
    for name in steps:
        assert sum(bool(re.match(SUMMARY.format(re.escape(name)), x)) for x in lines) == 1, \
            (name, err)
    assert "01-image/finetune: loss " in err and "02-video/merge: 21 tensors merged" in err
    assert re.search(r"^02-video/finetune step 8/8 loss \d+\.\d+ \d+ tok/s$", err, re.M), err
    # Every line is a step's, says where Ray runs, or is a warning naming its log: nothing else
    # (the tiny run scores 0 on a task, which the report warns about).
    others = [x for x in lines if not x.startswith(("01-image/", "02-video/", "starting a "))
              and not re.fullmatch(r"WARNING .+ \(see \S+/logs/mera\.log\)", x)]
    assert not others, others
    assert "BRG after 2 evaluated stages" in ray_run["out"]  # the report, as before


def test_logs_are_per_step_and_rank(ray_run):
    layout = ray_run["layout"]
    for name in ("01-image/finetune", "02-video/realign"):
        ranks = [open(layout.step_log(name, r)).read() for r in (0, 1)]
        total = 8 if name.endswith("finetune") else 6
        assert f"INFO mera_ds.train: {name} step {total}/{total} loss" in ranks[0]
        assert f"{name}: ranks 0..1 on 127.0.0.1 127.0.0.1" in ranks[0]
        assert "Reporting training result" in ranks[1]  # Ray Train's own, on every rank
    for name in ("01-image/replay", "01-image/evaluate", "02-video/merge"):
        assert os.path.getsize(layout.step_log(name)) > 0, name
    assert "merge mera" in open(layout.step_log("02-video/merge")).read()
    driver = open(layout.driver_log).read()
    assert "INFO ray._private.worker: Started a local Ray instance" in driver
    assert "INFO mera_ds.console: 02-video/evaluate: " in driver
    assert "(TrainController pid=" in driver  # what Ray's processes print


def test_verbose_shows_everything_as_before(ray_run, tmp_path):
    proc = mera("-v", "stage", "finetune", "--config", str(ray_run["path"]), "--modality",
                "image", "--run", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "(RayTrainWorker pid=" in proc.stderr
    assert re.search(r"RayTrainWorker pid=\d+\)\S* 01-image/finetune step 8/8 loss",
                     proc.stderr), proc.stderr[-3000:]
    assert "DEBUG" in proc.stderr
    assert os.listdir(tmp_path / "run" / "logs") == ["mera.log"]


def test_a_failed_step_is_one_line_naming_its_log(ray_run, tmp_path):
    from mera_ds.data.tar import expand_shards

    cfg = json.loads(json.dumps(ray_run["cfg"]))
    cfg["run_dir"] = str(tmp_path / "run")
    for k, url in enumerate(expand_shards(cfg["modalities"][0]["train_shards"])):
        data = open(url, "rb").read()
        (tmp_path / f"cut-{k}.tar").write_bytes(data[: len(data) // 3])
    cfg["modalities"][0]["train_shards"] = str(tmp_path / "cut-{0..3}.tar")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = mera("stage", "finetune", "--config", str(path), "--modality", "image")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    found = re.fullmatch(r"mera: error: 01-image/finetune failed on the cluster: .*corrupt shard"
                         r".* \(see (\S+/logs/01-image-finetune/rank-(\d)\.log)\)", lines[-1])
    assert found, lines
    assert "corrupt shard" in open(found[1]).read()
    assert not [x for x in lines if NOISE.search(x)], lines


def test_in_process_steps_log_to_their_file(ray_run, tmp_path):
    """--executor local: the same console (the bar fed by the training loop's callback) and the
    same log files, rank 0 only."""
    proc = mera("stage", "finetune", "--config", str(ray_run["path"]), "--modality", "image",
                "--run", str(tmp_path / "run"), "--executor", "local")
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("01-image/finetune: loss ") and len(lines) <= 10, lines
    assert "01-image/finetune step 8/8 loss " in proc.stderr
    logs = RunLayout(str(tmp_path / "run"), ("image",))
    assert "01-image/finetune step 8/8 loss" in open(logs.step_log("01-image/finetune")).read()
    assert not os.path.exists(logs.step_log("01-image/finetune", 1))
