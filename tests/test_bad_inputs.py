"""Every bad input a user can give ends in one line, `mera: error: <what, naming the thing at
fault>`, a non-zero exit and no traceback, and writes nothing: one table of cases through the real
CLI (config, shards, run preflight, merge, report, S3, cluster)."""
import json
import os
import shutil
import struct
import time
import urllib.request

import fsspec
import pytest
import s3fs
import yaml

from mera_ds.cli import main
from mera_ds.data.tar import expand_shards
from tests.conftest import default_config, file_digests, free_port
from tests.test_merge import tiny_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {}


def case(expected: str):
    """Register a case: a function(ctx) that sets up files under ctx.dir and returns argv;
    `expected` must appear in the error line ({dir} is replaced by the case's directory)."""
    def register(fn):
        CASES[fn.__name__] = (fn, expected)
        return fn
    return register


class Ctx:
    def __init__(self, root, shards, llms, s3):
        self.dir, self.shards, self.llms, self.s3 = str(root), shards, llms, s3

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def write(self, name, data):
        with open(self.path(name), "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        return self.path(name)

    def config(self, edit=None, name="run.yaml"):
        """A valid run config (runs into ctx.dir/run), changed by edit(dict)."""
        cfg = default_config(self.shards, self.path("run"))
        if edit:
            edit(cfg)
        return self.write(name, yaml.safe_dump(cfg))

    def llm_copy(self, name="bad"):
        return shutil.copytree(self.llms[1], self.path(name))

    def run_dir(self, manifest):
        os.makedirs(self.path("run"))
        self.write("run/manifest.json", manifest if isinstance(manifest, str)
                   else json.dumps(manifest))
        return self.path("run")


def set_(path, value):
    def edit(cfg):
        *head, last = path.split(".")
        node = cfg
        for k in head:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[last] = value
    return edit


# --- config ---------------------------------------------------------------------------------------

@case("{dir}: is a directory")
def config_is_a_directory(ctx):
    return ["config", "check", ctx.dir]


@case("binary.yaml: not a text file")
def config_binary(ctx):
    return ["config", "check", ctx.write("binary.yaml", b"\x00\xff\xfe" * 40)]


@case("missing.yaml: no such config file")
def config_missing(ctx):
    return ["config", "check", ctx.path("missing.yaml")]


@case("broken.yaml: not valid YAML")
def config_yaml_syntax(ctx):
    return ["config", "check", ctx.write("broken.yaml", "run_dir: [x\nseed: 0\n")]


@case("dup.yaml: not valid YAML at line 2: duplicate key 'seed'")
def config_duplicate_key(ctx):
    return ["config", "check", ctx.write("dup.yaml", "seed: 0\nseed: 1\n")]


@case("stages.finetune.stepz")
def config_unknown_field(ctx):
    return ["config", "check", ctx.config(set_("stages.finetune.stepz", 3))]


@case("run_dir")
def config_empty_run_dir(ctx):
    return ["config", "check", ctx.config(set_("run_dir", ""))]


@case("ftp://")
def config_ftp_run_dir(ctx):
    return ["config", "check", ctx.config(set_("run_dir", "ftp://host/runs/x"))]


@case("stages.realign.mode")
def config_realign_mode_unknown(ctx):
    return ["config", "check", ctx.config(set_("stages.realign.mode", "fsdp"))]


@case("llm.tiny: hidden_size must be positive, got -8")
def config_negative_tiny_size(ctx):
    return ["config", "check", ctx.config(set_("llm.tiny", {"hidden_size": -8}))]


@case("modalities[0].encoder.tiny: hidden_size must be positive, got 0")
def config_negative_encoder_size(ctx):
    return ["config", "check", ctx.config(set_("modalities.0.encoder.tiny", {"hidden_size": 0}))]


@case("stages.merge.strategy")
def config_unknown_strategy(ctx):
    return ["config", "check", ctx.config(set_("stages.merge.strategy", "average"))]


@case("stages.finetune.steps")
def config_negative_steps(ctx):
    return ["config", "check", ctx.config(set_("stages.finetune.steps", -1))]


@case("modalities: modality 'image' appears twice")
def config_modality_twice(ctx):
    return ["config", "check", ctx.config(lambda c: c["modalities"].append(c["modalities"][0]))]


@case("cluster.deepspeed_config")
def config_missing_deepspeed_config(ctx):
    return ["config", "check", ctx.config(set_("cluster.deepspeed_config", "nope.json"))]


# --- shards and the run's preflight ---------------------------------------------------------------

@case("nothing-{000000..000003}.tar: no shards matched")
def run_train_shards_missing(ctx):
    return ["run", ctx.config(set_("modalities.1.train_shards",
                                   ctx.path("nothing-{000000..000003}.tar")))]


@case("eval-missing.tar: no such shard")
def run_eval_shard_missing(ctx):
    return ["run", ctx.config(set_("modalities.2.eval_shards", ctx.path("eval-missing.tar")))]


@case("llm.path")
def run_llm_path_missing(ctx):
    return ["run", ctx.config(set_("llm.path", ctx.path("no-llm")))]


@case("modalities[0].encoder.path")
def run_encoder_path_missing(ctx):
    def edit(cfg):
        cfg["modalities"][0]["encoder"].update(path=ctx.path("no-encoder"))
    return ["run", ctx.config(edit)]


@case("train-{000000..000003}.tar: no shards matched")
def stage_shards_missing(ctx):
    return ["stage", "finetune", "--modality", "video", "--config",
            ctx.config(set_("modalities.1.train_shards", ctx.path("train-{000000..000003}.tar")))]


@case("modality 'speech' is not in the config")
def stage_unknown_modality(ctx):
    return ["stage", "finetune", "--modality", "speech", "--config", ctx.config()]


@case("cut.tar: corrupt shard")
def shards_truncated(ctx):
    src = expand_shards(ctx.shards["image"]["eval"])[0]
    with open(src, "rb") as f:
        data = f.read()
    return ["shards", "inspect", ctx.write("cut.tar", data[: len(data) // 2 + 100])]


@case("absent.tar: no such shard")
def shards_missing(ctx):
    return ["shards", "inspect", ctx.path("absent.tar")]


@case("unbalanced braces")
def shards_unbalanced_braces(ctx):
    return ["shards", "inspect", ctx.path("train-{0..3.tar")]


@case("run/manifest.json: the run's order is ['video', 'image']")
def run_resume_with_other_order(ctx):
    ctx.run_dir(json.dumps({"version": 2, "order": ["video", "image"], "method": "mera",
                            "config": {"digest": "0" * 16}, "steps": {"01-video/finetune": {}}}))
    return ["run", ctx.config(), "--resume"]


# --- merge ----------------------------------------------------------------------------------------

def merge_args(ctx, prev=None, ft=None, out=None):
    return ["merge", "--prev", prev or ctx.llms[0], "--finetuned", ft or ctx.llms[1],
            "--step", "2", "--out", out or ctx.path("out")]


@case("file.txt: is a file, not a directory")
def merge_out_under_a_file(ctx):
    return merge_args(ctx, out=os.path.join(ctx.write("file.txt", "x"), "merged"))


@case("no-such-llm: no such directory")
def merge_prev_missing(ctx):
    return merge_args(ctx, prev=ctx.path("no-such-llm"))


def rewrite_header(path, edit):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        rest = f.read()
    edit(header)
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + rest)


def first_shard(d):
    return os.path.join(d, sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[0])


@case("model-00001-of-")
def merge_header_with_string_offsets(ctx):
    ft = ctx.llm_copy()

    def edit(header):
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"] = ["0", "x"]
    rewrite_header(first_shard(ft), edit)
    return merge_args(ctx, ft=ft)


@case("not a safetensors file")
def merge_header_not_json(ctx):
    ft = ctx.llm_copy()
    with open(first_shard(ft), "r+b") as f:
        f.seek(8)
        f.write(b"{not json")
    return merge_args(ctx, ft=ft)


def point_first_tensor_at(ft, filename):
    """Rewrite the index of the LLM directory `ft` so that its first tensor is in `filename`."""
    index = os.path.join(ft, "model.safetensors.index.json")
    with open(index) as f:
        data = json.load(f)
    data["weight_map"][next(iter(data["weight_map"]))] = filename
    with open(index, "w") as f:
        json.dump(data, f)


@case("../other/model.safetensors")
def merge_index_entry_outside_dir(ctx):
    ft = ctx.llm_copy()
    os.makedirs(ctx.path("other"))
    shutil.copy(first_shard(ft), ctx.path("other", "model.safetensors"))
    point_first_tensor_at(ft, "../other/model.safetensors")
    return merge_args(ctx, ft=ft)


@case("model-00009-of-00009.safetensors")
def merge_index_names_missing_file(ctx):
    ft = ctx.llm_copy()
    point_first_tensor_at(ft, "model-00009-of-00009.safetensors")
    return merge_args(ctx, ft=ft)


@case("out: already exists")
def merge_out_exists(ctx):
    os.makedirs(ctx.path("out"))
    ctx.write("out/keep.txt", "mine")
    return merge_args(ctx)


@case("--shard-size")
def merge_bad_shard_size(ctx):
    return merge_args(ctx) + ["--shard-size", "lots"]


@case("step must be >= 2")
def merge_mera_without_step(ctx):
    return [a for a in merge_args(ctx) if a not in ("--step", "2")]


# --- report ---------------------------------------------------------------------------------------

@case("manifest.json: not a mera-ds manifest of version 2 (no 'order')")
def report_manifest_without_order(ctx):
    return ["report", ctx.run_dir({"version": 2, "steps": {}})]


@case("manifest.json: not a mera-ds manifest (a JSON list)")
def report_manifest_is_a_list(ctx):
    return ["report", ctx.run_dir("[1, 2]")]


@case("manifest.json: not valid JSON")
def report_manifest_not_json(ctx):
    return ["report", ctx.run_dir("{")]


def run_with_scores(ctx, scores):
    run = ctx.run_dir({"version": 2, "order": ["image"], "method": "mera", "config": {},
                       "steps": {}})
    os.makedirs(os.path.join(run, "stages", "01-image", "eval"))
    ctx.write("run/stages/01-image/eval/metrics.json",
              json.dumps({"modality": "image", "scores": scores}))
    return ["report", run]


@case("metrics.json: score of 'image' is not a number")
def report_string_scores(ctx):
    return run_with_scores(ctx, {"image": "high"})


@case("metrics.json: score of 'image' is not a number")
def report_null_scores(ctx):
    return run_with_scores(ctx, {"image": None})


@case("unsupported URL scheme 'http'")
def report_http_url(ctx):
    return ["report", f"http://127.0.0.1:{free_port()}/runs/x"]


@case("mcl.json: not a result of `mera bench mcl`")
def bench_summary_of_empty_object(ctx):
    return ["bench", "mcl-summary", ctx.write("mcl.json", "{}")]


# --- S3 -------------------------------------------------------------------------------------------

@case("s3://no-such-bucket-mera/x.tar: no such bucket")
def s3_missing_bucket(ctx):
    return ["shards", "inspect", "s3://no-such-bucket-mera/x.tar"]


@case("s3://bucket/x.tar: cannot reach S3 at http://127.0.0.1:")
def s3_unreachable(ctx):
    ctx.env["FSSPEC_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    return ["shards", "inspect", "s3://bucket/x.tar"]


@case("s3://mera-private/x.tar: access denied (The AWS Access Key Id you provided does not "
      "exist in our records.)")
def s3_wrong_credentials(ctx):
    ctx.env.update(AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG0", AWS_SECRET_ACCESS_KEY="wrong")
    ctx.moto_auth = True
    return ["shards", "inspect", "s3://mera-private/x.tar"]


@case("s3://no-such-bucket-mera/runs/x: no such bucket")
def s3_run_dir_missing_bucket(ctx):
    return ["run", ctx.config(set_("run_dir", "s3://no-such-bucket-mera/runs/x"))]


# --- cluster --------------------------------------------------------------------------------------

@case("under a launcher")
def run_under_a_launcher(ctx):
    ctx.env["WORLD_SIZE"] = "2"
    return ["run", ctx.config()]


@case("cluster.ray_address 127.0.0.1:")
def run_ray_address_unreachable(ctx):
    return ["run", ctx.config(), "--ray-address", f"127.0.0.1:{free_port()}"]


def moto_auth(endpoint, count):
    """moto checks credentials after `count` more requests (its default: never); returns the
    setting it replaces. Process-wide, so it is set back right after the case."""
    req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=str(count).encode(),
                                 method="POST", headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]


@pytest.fixture(scope="module")
def llms(tmp_path_factory):
    root = tmp_path_factory.mktemp("llms")
    return [tiny_llama(root / f"m{k}", seed=k) for k in range(2)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_and_writes_nothing(name, tmp_path, builtin_shards, llms,
                                                  s3_endpoint, monkeypatch, capsys):
    setup, expected = CASES[name]
    ctx = Ctx(tmp_path, builtin_shards, llms, s3_endpoint)
    ctx.env, ctx.moto_auth = {}, False
    argv = setup(ctx)
    for k, v in ctx.env.items():
        monkeypatch.setenv(k, v)
    if "FSSPEC_S3_ENDPOINT_URL" in ctx.env:  # this process reads fsspec's config, not the env
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": ctx.env[
            "FSSPEC_S3_ENDPOINT_URL"]})
    s3fs.S3FileSystem.clear_instance_cache()
    before = file_digests(tmp_path)
    capsys.readouterr()
    start = time.monotonic()
    previous = moto_auth(s3_endpoint, 0) if ctx.moto_auth else None
    try:
        code = main(argv)
    finally:
        if previous is not None:
            moto_auth(s3_endpoint, previous)
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mera: error: ")]
    assert code not in (0, None), err
    assert "Traceback" not in err and len(lines) == 1, err
    assert expected.replace("{dir}", ctx.dir) in lines[0], lines[0]
    assert "\n" not in lines[0]
    assert file_digests(tmp_path) == before, "a failed command wrote or changed files"
    # An unreachable S3 endpoint takes longest: botocore's retries back off up to ~31 s.
    assert seconds < 45, f"took {seconds:.0f} s to fail"


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30


def test_debug_raises_for_the_traceback(tmp_path, monkeypatch):
    """--debug or MERA_DEBUG=1 lets the error through with its traceback, for a bug report."""
    with pytest.raises(Exception, match="is a directory"):
        main(["--debug", "config", "check", str(tmp_path)])
    monkeypatch.setenv("MERA_DEBUG", "1")
    with pytest.raises(Exception, match="is a directory"):
        main(["config", "check", str(tmp_path)])


def test_local_paths_on_a_multi_node_cluster_must_be_declared_shared(tmp_path):
    from mera_ds.config import parse_config
    from mera_ds.errors import MeraError
    from mera_ds.run.preflight import check_nodes

    cfg = parse_config(default_config({m: {"train": "a.tar", "eval": "b.tar"} for m in
                                       ("image", "video", "audio", "depth")}, tmp_path / "run"))
    check_nodes(cfg, 1)
    with pytest.raises(MeraError, match=r"run_dir .*/run: a local path, and the Ray cluster "
                                        r"has 2 nodes; use s3://"):
        check_nodes(cfg, 2)
    shared = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(
        update={"shared_filesystem": True})})
    check_nodes(shared, 2)
    on_s3 = cfg.model_copy(update={"run_dir": "s3://bucket/run"})
    with pytest.raises(MeraError, match=r"modalities\[0\].train_shards .*/a.tar: a local path"):
        check_nodes(on_s3, 2)
    for m in on_s3.modalities:
        m.train_shards = m.eval_shards = "s3://bucket/shards/x-{0000..0003}.tar"
    check_nodes(on_s3, 2)
