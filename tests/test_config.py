"""The run config: the shipped configs load; every bad value is one line naming file and field."""
import copy
import subprocess
import sys

import pytest
import yaml

from mera_ds.config import ConfigError, load_config, parse_config, parse_size

DEFAULT = "launch/configs/default.yaml"


def base() -> dict:
    with open(DEFAULT) as f:
        return yaml.safe_load(f)


def write(tmp_path, data, name="run.yaml") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("path", [DEFAULT, "launch/configs/paper_8b.yaml"])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert [m.name for m in cfg.modalities] == ["image", "video", "audio", "depth"]


def test_paper_hyperparameters_in_paper_scale_config():
    cfg = load_config("launch/configs/paper_8b.yaml")
    ft, ra, al = cfg.stages.finetune, cfg.stages.realign, cfg.stages.align
    assert (ft.lr_llm, ft.lr_connector, ft.batch_size) == (2e-4, 2e-5, 16)
    assert (ra.lr, ra.batch_size, al.lr, al.batch_size) == (2e-5, 16, 1e-3, 128)
    assert cfg.llm.dtype == "bfloat16" and cfg.stages.merge.strategy == "mera"
    # 2e-4 is a LoRA rate (LLaVA-1.5's LoRA recipe): never on a full finetune of the 8B LLM.
    assert ft.lora is not None and (ft.lora.r, ft.lora.alpha) == (128, 128)


def _set(d, dotted, value):
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d[int(k)] if k.isdigit() else d.setdefault(k, {})
    last = keys[-1]
    if value is DELETE:
        del d[int(last) if last.isdigit() else last]
    else:
        d[int(last) if last.isdigit() else last] = value


DELETE = object()

# (change, text the error line must contain): each a distinct mistake a user makes.
BAD = [
    ("run_dir", DELETE, "run_dir: required field is missing"),
    ("modalities", [], "modalities: List should have at least 1 item"),
    ("modalities.0.name", "Image!", "modalities[0].name:"),
    ("modalities.1.name", "image", "modalities: modality 'image' appears twice"),
    ("modalities.0.encoder.type", "resnet", "modalities[0].encoder.type:"),
    ("modalities.2.encoder", {"type": "precomputed"}, "feature_dim is required"),
    ("modalities.0.connector.type", "qformer", "modalities[0].connector.type:"),
    ("modalities.0.train_shards", "ftp://host/x.tar", "unsupported URL scheme 'ftp'"),
    ("modalities.3.eval_shards", "  ", "modalities[3].eval_shards: empty shard pattern"),
    ("stages.finetune.lr_llm", -1.0, "stages.finetune.lr_llm: Input should be greater than 0"),
    ("stages.finetune.lr_llm", "fast", "stages.finetune.lr_llm: Input should be a valid number"),
    ("stages.finetune.batch_size", 12, "stages.finetune.batch_size 12 is not a multiple"),
    ("stages.realign.num_workers", 3, "stages.realign.batch_size 16 is not a multiple of "
     "micro_batch_size x num_workers = 24"),
    ("stages.realign.replay_ratio", 1.5, "stages.realign.replay_ratio: Input should be less"),
    ("stages.realign.mode", "fsdp", "stages.realign.mode:"),
    ("stages.merge.strategy", "slerp", "stages.merge.strategy:"),
    ("stages.merge.shard_size", "big", "stages.merge.shard_size: 'big' is not a size"),
    ("stages.merge.weights", "heavy", "stages.merge.weights: Input should be a valid list"),
    ("cluster.deepspeed_config", "ds_configs/nope.json", "cluster.deepspeed_config: no DeepSpeed"),
    ("cluster.num_workers", 0, "cluster.num_workers: Input should be greater than or equal to 1"),
    ("cluster.schedule", "eager", "cluster.schedule:"),
    ("llm.dtype", "fp8", "llm.dtype:"),
    ("stages.finetune.lr", 1e-4, "stages.finetune.lr: unknown field"),
    ("data.on_corrupt", "ignore", "data.on_corrupt:"),
]


@pytest.mark.parametrize("field,value,expected", BAD, ids=[b[0] + "=" + repr(b[1])[:12] for b in BAD])
def test_bad_config_is_one_line_naming_file_and_field(tmp_path, field, value, expected):
    data = copy.deepcopy(base())
    _set(data, field, value)
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(path + ": ")
    assert expected in msg


def test_bad_json_in_deepspeed_config(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text("{not json")
    data = base()
    data["cluster"]["deepspeed_config"] = str(ds)
    with pytest.raises(ConfigError, match=r"cluster.deepspeed_config: .* is not valid JSON"):
        load_config(write(tmp_path, data))


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "run_dir: x\nmodalities: [\n  - {name: a\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "absent.yaml"))
    with pytest.raises(ConfigError, match=r"\(top level\): expected a mapping"):
        load_config(write(tmp_path, "- just\n- a list\n"))


def test_fingerprint_tracks_what_a_run_computes():
    from mera_ds.config import parse_config

    a, b = base(), base()
    assert load_config(DEFAULT).digest() == load_config(DEFAULT).digest()
    b["stages"]["finetune"]["steps"] += 1
    assert parse_config(b).fingerprint()["stages.finetune.steps"] == \
        parse_config(a).fingerprint()["stages.finetune.steps"] + 1
    assert parse_config(a).digest() != parse_config(b).digest()
    b = base()
    b["cluster"]["ray_address"] = "127.0.0.1:6379"  # where it runs, not what it computes
    assert parse_config(a).fingerprint() == parse_config(b).fingerprint()


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1024") == 1024


def test_cli_prints_one_line_error(tmp_path):
    data = base()
    data["stages"]["merge"]["strategy"] = "slerp"
    path = write(tmp_path, data)
    out = subprocess.run([sys.executable, "-m", "mera_ds", "config", "check", path],
                         capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == [f"mera: error: {path}: stages.merge.strategy: 'slerp' is not a merge "
                     f"strategy (one of mera, linear, task_arithmetic, ties, dare, pcb, ada)"]


@pytest.mark.parametrize("run_dir, message", [
    ("", "run_dir: empty run directory"),
    ("ftp://host/runs/a", "run_dir: unsupported URL scheme 'ftp'"),
])
def test_bad_run_dir_is_refused(tmp_path, run_dir, message):
    data = base()
    data["run_dir"] = run_dir
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, data))


def test_unreadable_config_files_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path}: is a directory, not a config file"):
        load_config(str(tmp_path))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"run_dir: x\n\xff\xfe\x00")
    with pytest.raises(ConfigError, match="binary.yaml: not a text file"):
        load_config(str(binary))
    text = open(DEFAULT).read() + "seed: 3\n"  # a second `seed:` would silently win
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+: duplicate key 'seed'"):
        load_config(write(tmp_path, text))


def test_local_model_paths_become_absolute_and_hub_ids_stay(tmp_path, monkeypatch):
    """Ray workers and launcher ranks run elsewhere: a local LLM or encoder directory is made
    absolute when the config is read, as shard patterns are; a hub id is left to the hub."""
    from mera_ds.config import EncoderConfig, LLMConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "base").mkdir(parents=True)
    assert LLMConfig(path="./missing").path == str(tmp_path / "missing")
    assert LLMConfig(path="models/base").path == str(tmp_path / "models" / "base")
    assert LLMConfig(path="org/name").path == "org/name"
    assert LLMConfig(path="s3://b/llm").path == "s3://b/llm"
    assert EncoderConfig(type="whisper", path="./models/base").path == \
        str(tmp_path / "models" / "base")


def test_set_overrides_fields_of_the_file():
    """--set: the config of the file with those fields changed, the same as a file saying so."""
    cfg = load_config("launch/configs/mcl.yaml",
                      ["stages.finetune.lora=null", "stages.finetune.lr_llm=2e-4",
                       "modalities.1.connector.type=linear", "stages.align={enabled: false}"])
    assert cfg.stages.finetune.lora is None and cfg.stages.finetune.lr_llm == 2e-4
    assert cfg.modalities[1].connector.type == "linear" and not cfg.stages.align.enabled
    with open("launch/configs/mcl.yaml") as f:
        data = yaml.safe_load(f)
    data["stages"]["finetune"]["lora"] = None
    assert load_config("launch/configs/mcl.yaml", ["stages.finetune.lora=null"]).digest() == \
        parse_config(data, "x").digest()


@pytest.mark.parametrize("item, message", [
    ("stages.finetune", "--set stages.finetune: expected KEY=VALUE"),
    ("stages.finetune.lroa=1", "launch/configs/mcl.yaml (with --set stages.finetune.lroa=1): "
                               "stages.finetune.lroa: unknown field"),
    ("modalities.7.name=x", "--set modalities.7.name=x: modalities is a list of 4; '7' is not"),
    ("seed.x=1", "--set seed.x=1: seed is not a mapping or a list"),
    ("seed=[1", "--set seed=[1: the value is not valid YAML"),
])
def test_bad_set_is_one_line_naming_it(item, message):
    out = subprocess.run([sys.executable, "-m", "mera_ds", "config", "check",
                          "launch/configs/mcl.yaml", "--set", item], capture_output=True, text=True)
    line = out.stderr.strip()
    assert out.returncode == 2 and "\n" not in line and line.startswith(f"mera: error: {message}")
