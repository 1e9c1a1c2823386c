"""The run config: one YAML file, validated by pydantic.

Every bad value stops with one line, ``FILE: FIELD: what is wrong``; see :func:`load_config`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from typing import Any, Literal, Optional, Sequence

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_validator)

from mera_ds.errors import MeraError
from mera_ds.merge.strategies import STRATEGIES
from mera_ds.metrics import METRICS

# Relative paths in a config (shards, DeepSpeed configs) are taken from the working directory,
# falling back to the repository root so the shipped ds_configs/ are found from anywhere.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODALITY_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class ConfigError(MeraError):
    pass


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in a field name must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def _positive_sizes(v: dict[str, Any]) -> dict[str, Any]:
    """A tiny model's overrides are sizes, counts and scales: a zero or negative one is a typo
    that would otherwise fail deep inside transformers, or build a degenerate model."""
    for key, value in v.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            raise ValueError(f"{key} must be positive, got {value}")
    return v


def _one_of(name: str, registry: dict, what: str) -> str:
    """A name a registry (merge strategies, metrics) must hold."""
    if name not in registry:
        raise ValueError(f"{name!r} is not a {what} (one of {', '.join(registry)})")
    return name


class EncoderConfig(_Strict):
    """A frozen modality encoder: a built-in tiny one (path unset) or a pretrained HF path/id."""

    type: Literal["clip_vision", "video", "whisper", "depth", "precomputed"]
    path: Optional[str] = None
    tiny: dict[str, Any] = Field(default_factory=dict, description="overrides of the tiny config")
    _path = field_validator("path")(classmethod(lambda cls, v: model_path(v)))
    num_frames: int = Field(4, ge=1, description="video: frames sampled per clip")
    time_tokens: int = Field(4, ge=1, description="video: tokens per clip after temporal pooling")
    spatial_grid: int = Field(2, ge=1, description="video: each frame pooled to a grid x grid")
    num_tokens: int = Field(4, ge=1, description="whisper, precomputed: tokens per sample")
    feature_dim: Optional[int] = Field(None, ge=1, description="precomputed: feature width")

    _tiny = field_validator("tiny")(classmethod(lambda cls, v: _positive_sizes(v)))

    @model_validator(mode="after")
    def _precomputed_needs_dim(self):
        if self.type == "precomputed" and self.feature_dim is None:
            raise ValueError("feature_dim is required when type is 'precomputed'")
        return self


class ConnectorConfig(_Strict):
    type: Literal["linear", "mlp2x_gelu"] = "mlp2x_gelu"


class TaskConfig(_Strict):
    """How a modality's task is scored: a metric of mera_ds.metrics on at most max_new_tokens
    generated tokens."""

    metric: str = Field("exact_match", description="one of " + ", ".join(METRICS) +
                        "; the score of the performance matrix and the BRG")
    extra_metrics: list[str] = Field(
        default_factory=list, description="metrics reported beside `metric` (not in the BRG)")
    max_new_tokens: int = Field(8, ge=1)

    _metric = field_validator("metric")(classmethod(
        lambda cls, v: _one_of(v, METRICS, "metric")))

    @field_validator("extra_metrics")
    @classmethod
    def _extra(cls, v: list[str]) -> list[str]:
        return [_one_of(m, METRICS, "metric") for m in v]


class ModalityConfig(_Strict):
    name: str
    encoder: EncoderConfig
    connector: ConnectorConfig = Field(default_factory=ConnectorConfig)
    train_shards: str = Field(description="brace pattern of local paths or s3:// URLs")
    eval_shards: str
    align_shards: Optional[str] = Field(None, description="caption-style data; default train")
    task: TaskConfig = Field(default_factory=TaskConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not MODALITY_NAME.match(v):
            raise ValueError(f"{v!r} is not a modality name (lower case letters, digits, _)")
        return v

    @field_validator("train_shards", "eval_shards", "align_shards")
    @classmethod
    def _url(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else storage_url(v, "shard pattern")


class LLMConfig(_Strict):
    """The shared causal LLM: a built-in tiny Llama (path unset) or an HF path/id."""

    path: Optional[str] = None
    tiny: dict[str, Any] = Field(default_factory=dict, description="overrides of the tiny config")
    _path = field_validator("path")(classmethod(lambda cls, v: model_path(v)))
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "flex_attention",
                                 "eager"] = "auto"
    max_length: int = Field(256, ge=8, description="tokens per sample, modality tokens included")

    _tiny = field_validator("tiny")(classmethod(lambda cls, v: _positive_sizes(v)))


class TrainingSettings(_Strict):
    """What every training phase (align, finetune, realign) sets."""

    packing: bool = Field(True, description="pack samples into rows of llm.max_length tokens "
                          "instead of padding each to the longest")
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1, description="global batch (all workers, accumulation included)")
    micro_batch_size: int = Field(ge=1, description="per worker and step")
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    num_workers: Optional[int] = Field(
        None, ge=1, description="Ray Train workers of this phase's jobs (e.g. realign on fewer "
        "than finetune, the rest of the cluster left to the steps beside it); unset: "
        "cluster.num_workers. A launcher's jobs have the launcher's ranks")


class AlignConfig(TrainingSettings):
    enabled: bool = False
    lr: float = Field(1e-3, gt=0)
    steps: int = Field(100, ge=1)
    batch_size: int = Field(128, ge=1)
    micro_batch_size: int = Field(16, ge=1)


LLAMA_LINEAR_LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj"]


class LoraConfig(_Strict):
    """LoRA adapters (peft) on the LLM's linear layers: only they (and the connectors) train;
    the finetuned LLM is exported with them folded in, and the adapter kept beside it."""

    r: int = Field(8, ge=1, description="rank")
    alpha: float = Field(16, gt=0, description="the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: list(LLAMA_LINEAR_LAYERS), min_length=1,
        description="names of the linear layers that get an adapter (Llama's: all of them)")


class FinetuneConfig(TrainingSettings):
    lora: Optional[LoraConfig] = Field(None, description="unset: full finetune of the LLM")
    lr_llm: float = Field(2e-4, gt=0)
    lr_connector: float = Field(2e-5, gt=0)
    steps: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    # The replay-free baselines of `mera bench mcl` (mera_ds.run.mcl): their finetunes from the
    # second stage on add a regularizer toward theta_{i-1}. EasyCL's defaults for LLMs.
    ewc_lambda: float = Field(
        1e4, ge=0, description="ewc: lambda of the penalty (lambda / 2) sum F (W - W*)^2 toward "
        "the previous stage's LLM W*, F the summed Fisher of the earlier stages")
    ewc_batches: int = Field(
        8, ge=1, description="ewc: batches of batch_size samples (all ranks together) of a "
        "stage's training data whose squared loss gradients, averaged, are its Fisher")
    lwf_alpha: float = Field(
        1.0, ge=0, description="lwf: weight of the distillation term alpha T^2 KL(teacher || "
        "student) on the answer tokens, the teacher being the previous stage's LLM (Li & "
        "Hoiem's lambda_o = 1)")
    lwf_temperature: float = Field(2.0, gt=0, description="lwf: the distillation's "
                                   "temperature T (Li & Hoiem: 2)")


class MergeConfig(_Strict):
    strategy: str = Field("mera", description="one of " + ", ".join(STRATEGIES))
    weights: Optional[list[float]] = Field(
        None, description="linear: one weight per merged model, the previous one first")
    lam: float = Field(1.0, description="task_arithmetic/ties/dare/pcb: scale of the merged deltas")
    density: float = Field(0.2, gt=0, le=1, description="ties, pcb: fraction of each delta kept")
    drop_p: float = Field(0.9, ge=0, lt=1, description="dare: drop probability")
    seed: int = 0
    shard_size: str = Field("2GB", description="output shard size, e.g. 500MB")
    across_stages: bool = Field(
        False, description="the merge of stage i combines the task vectors theta_ft_k - "
        "theta_0 of every stage k <= i (theta_0, the LLM before the first modality, is written "
        "to RUN/base/llm once) with the strategy, instead of theta_{i-1} and theta_ft_i; mera "
        "over them is the same running average; task_arithmetic and dare, which sum the task "
        "vectors, take lam / i, so that lam scales their average")
    ada_lr: float = Field(
        1e-2, gt=0, description="ada: learning rate of the merge coefficients, which the realign "
        "fits on the replay mix with the connectors (its optimizer and schedule)")
    coefficients: Optional[str] = Field(
        None, description="ada: JSON file {tensor: [lambda_1, .., lambda_i]} of the coefficients "
        "(`mera merge`; in a run, the realign writes it and the plan passes it on)")
    threads: Optional[int] = Field(
        None, ge=1, description="threads merging (reading, converting, writing) in parallel; "
        "default: the cores the process may use (os.sched_getaffinity), shared between local "
        "--workers, 1 per Ray task. The output is the same whatever the number")

    _strategy = field_validator("strategy")(classmethod(
        lambda cls, v: _one_of(v, STRATEGIES, "merge strategy")))

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v)
        return v


class RealignConfig(TrainingSettings):
    enabled: bool = True
    lr: float = Field(2e-5, gt=0)
    steps: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    replay_ratio: float = Field(0.1, gt=0, le=1, description="r: share of each modality replayed")
    epochs: Optional[float] = Field(
        None, gt=0, description="the realign's length in passes over its replay mix: steps = "
        "ceil(epochs x replayed samples / batch_size), so it scales with the replay's size; "
        "unset: `steps`")
    mode: Literal["auto", "zero3", "data_parallel"] = Field(
        "auto", description="data_parallel: the frozen LLM whole on every rank, only the "
        "connectors' gradients all-reduced (no ZeRO gathers); zero3: the LLM partitioned as in "
        "finetune; auto: data_parallel where the LLM takes at most a third of a rank's device "
        "memory, else zero3")


class EvalConfig(_Strict):
    batch_size: int = Field(32, ge=1)
    max_samples: Optional[int] = Field(None, ge=1)
    text: Optional[str] = Field(
        None, description="a text file (one document per line; local or s3://) whose "
        "perplexity under theta_i every evaluate reports: how much of its language the LLM "
        "keeps (`mera shards base` writes one, held out of its pretraining)")

    _text = field_validator("text")(classmethod(
        lambda cls, v: None if v is None else storage_url(v, "text file")))


class StagesConfig(_Strict):
    align: AlignConfig = Field(default_factory=AlignConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    realign: RealignConfig = Field(default_factory=RealignConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


class ClusterConfig(_Strict):
    num_workers: int = Field(2, ge=1, description="training workers, one per GPU")
    use_gpu: bool = False
    deepspeed_config: str = "ds_configs/zero3_cpu.json"
    ray_address: Optional[str] = Field(None, description="None starts a local Ray instance")
    timeout_s: int = Field(1800, ge=10, description="collective timeout (NCCL/gloo)")
    max_failures: int = Field(1, ge=0, description="Ray Train restarts of a failed job")
    shared_filesystem: bool = Field(False, description="the config's local paths (run_dir, "
                                    "shards, models) are on a filesystem that every node of the "
                                    "Ray cluster mounts (NFS, Lustre, ...)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how Ray places a job's workers on nodes: PACK fills a node first "
        "(fewest bytes across the network), STRICT_SPREAD one worker per node")
    schedule: Literal["dependency", "sequential"] = Field(
        "dependency", description="on Ray, dependency: a step starts as soon as the steps "
        "whose artifacts it reads are done and the cluster has its resources (replay, realign "
        "and evaluate of a stage beside the next stage's finetune); sequential: one step at a "
        "time, in the plan's order. The in-process executor runs one at a time")
    _deepspeed: dict = PrivateAttr(default_factory=dict)  # the JSON at deepspeed_config

    @field_validator("deepspeed_config")
    @classmethod
    def _ds_config(cls, v: str) -> str:
        path = resolve_path(v)
        if not os.path.isfile(path):
            raise ValueError(f"no DeepSpeed config at {v!r}")
        try:
            with open(path) as f:
                json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{v!r} is not valid JSON ({e.msg}, line {e.lineno})") from None
        return os.path.abspath(path)

    @model_validator(mode="after")
    def _read_deepspeed(self) -> "ClusterConfig":
        with open(self.deepspeed_config) as f:
            self._deepspeed = json.load(f)
        return self

    @property
    def deepspeed(self) -> dict:
        """The DeepSpeed JSON, read where the config was parsed and carried with it: a worker on
        another node (or in a container) may not have the file at that path."""
        return copy.deepcopy(self._deepspeed)


class DataConfig(_Strict):
    on_corrupt: Literal["error", "skip"] = Field(
        "error", description="skip drops a corrupt sample or shard and logs the count")
    loader_workers: int = Field(0, ge=0)
    shuffle_buffer: int = Field(256, ge=0)


class RunConfig(_Strict):
    run_dir: str = Field(description="local path or s3:// prefix of the run")
    seed: int = 0
    llm: LLMConfig = Field(default_factory=LLMConfig)
    modalities: list[ModalityConfig] = Field(min_length=1, description="in training order")
    stages: StagesConfig = Field(default_factory=StagesConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    data: DataConfig = Field(default_factory=DataConfig)

    @field_validator("run_dir")
    @classmethod
    def _run_dir(cls, v: str) -> str:
        return storage_url(v, "run directory")

    @field_validator("modalities")
    @classmethod
    def _unique(cls, v: list[ModalityConfig]) -> list[ModalityConfig]:
        seen = set()
        for m in v:
            if m.name in seen:
                raise ValueError(f"modality {m.name!r} appears twice")
            seen.add(m.name)
        return v

    @model_validator(mode="after")
    def _learned_merge(self):
        mg = self.stages.merge
        if STRATEGIES[mg.strategy].learned and not (mg.across_stages and
                                                     self.stages.realign.enabled):
            raise ValueError(f"stages.merge.strategy {mg.strategy}: its coefficients are fitted "
                             f"by the realign over every stage's task vector: set stages.merge."
                             f"across_stages and stages.realign.enabled")
        return self

    @model_validator(mode="after")
    def _batches(self):
        for name, s in self.stages:
            if not isinstance(s, TrainingSettings):
                continue
            per_step = s.micro_batch_size * self.workers(name)
            if s.batch_size % per_step:
                workers = "num_workers" if s.num_workers else "cluster.num_workers"
                raise ValueError(
                    f"stages.{name}.batch_size {s.batch_size} is not a multiple of "
                    f"micro_batch_size x {workers} = {per_step}")
        return self

    def workers(self, phase: str) -> int:
        """The Ray Train workers of a training phase's jobs (a fisher job: its finetune's)."""
        settings = getattr(self.stages, "finetune" if phase == "fisher" else phase)
        return settings.num_workers or self.cluster.num_workers

    @property
    def max_workers(self) -> int:
        """The most workers any training job of the run has."""
        return max(self.workers(n) for n, s in self.stages if isinstance(s, TrainingSettings))

    def modality(self, name: str) -> ModalityConfig:
        for m in self.modalities:
            if m.name == name:
                return m
        raise ConfigError(f"modality {name!r} is not in the config "
                          f"(it has {', '.join(m.name for m in self.modalities)})")

    def fingerprint(self) -> dict[str, Any]:
        """{"stages.finetune.steps": 300, ...}: every setting that changes what a run computes
        (not where it runs). A resumed run whose fingerprint differs was changed; the manifest
        names the first field that did."""
        return dict(_flat(self.model_dump(mode="json")))

    def digest(self) -> str:
        """A short hash of the fingerprint, to tell configs apart at a glance."""
        blob = json.dumps(self.fingerprint(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_of(key: str) -> Any:
    """The default of a fingerprint key ("stages.merge.lam"); None where it has none."""
    model = RunConfig
    *parents, name = key.split(".")
    for part in parents:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and
                                 issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    field = model.model_fields.get(name)
    return None if field is None or field.is_required() else field.get_default(
        call_default_factory=True)


# Settings that may change between a run and its resume: where it runs, not what it computes.
NOT_FINGERPRINTED = {"cluster.ray_address", "cluster.placement_strategy", "cluster.schedule",
                     "cluster.shared_filesystem", "cluster.timeout_s", "cluster.max_failures",
                     "stages.merge.threads"}


def _flat(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = prefix + k
        if isinstance(v, dict):
            yield from _flat(v, key + ".")
        elif key not in NOT_FINGERPRINTED:
            yield key, v


def storage_url(v: str, what: str) -> str:
    """A local path (made absolute) or an s3:// URL; anything else is an error."""
    if not v.strip():
        raise ValueError(f"empty {what}")
    scheme = v.split("://", 1)[0] if "://" in v else "file"
    if scheme not in ("file", "s3"):
        raise ValueError(f"unsupported URL scheme {scheme!r} in {v!r} (local path or s3://)")
    return absolute(v)


def absolute(path: str) -> str:
    """Local paths become absolute (from the working directory) when a config is read: Ray
    workers and launcher ranks run elsewhere. URLs stay as they are."""
    return path if "://" in path else os.path.abspath(path)


def model_path(v: Optional[str]) -> Optional[str]:
    """An LLM's or encoder's path: a local one (node_cache.is_local_path: "./dir", "/dir"; or
    "dir/sub" that is there, else it reads as a hub id) made absolute, as `absolute` does for
    shards; a hub id or URL as it is."""
    from mera_ds.model.node_cache import is_local_path

    local = v and "://" not in v and (is_local_path(v) or os.path.isdir(v))
    return absolute(v) if local else v


def resolve_path(path: str) -> str:
    """A relative local path: from the working directory if it is there, else from the repository
    root. URLs and absolute paths stay as they are."""
    if "://" in path or os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(REPO_ROOT, path)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'2GB' -> 2_000_000_000 bytes; plain integers are bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (e.g. 500MB, 2GB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("function-after", "function-before"):
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _describe(err: dict) -> str:
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    if err["type"] == "missing":
        msg = "required field is missing"
    return msg


def parse_config(data: Any, source: str = "<config>") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: (top level): expected a mapping of fields, got "
                          f"{type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        # A model-level check names its field in the message; don't prefix "(top level)".
        loc = _loc(err["loc"])
        if loc == "(top level)" and err["type"] == "value_error":
            raise ConfigError(f"{source}: {_describe(err)}{more}") from None
        raise ConfigError(f"{source}: {loc}: {_describe(err)}{more}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (PyYAML keeps the last silently, so a
    pasted-in second `stages:` would undo the first without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def apply_overrides(data: dict, overrides: Sequence[str], source: str) -> dict:
    """`KEY=VALUE` settings over a config's fields (`--set`): KEY a dotted path, a list's items
    by index (modalities.0.train_shards); VALUE in YAML (`null` unsets, `2e-4`, `{r: 8}`)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. stages.finetune.lr_llm=2e-4")
        try:
            value = yaml.load(text, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item}: the value is not valid YAML "
                              f"({getattr(e, 'problem', None) or e})") from None
        *parents, last = key.split(".")
        node = data
        for i, part in enumerate([*parents, last]):
            where = ".".join(key.split(".")[:i]) or "the top level"
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {item}: {where} is a list of {len(node)}; "
                                      f"{part!r} is not one of its indexes")
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {where} is not a mapping or a list in {source}")
            if i == len(parents):
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}  # a section the file leaves out
                node = node[part]
    return data


def load_config(path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """Read and validate a run config, with `overrides` (apply_overrides) set over the file's
    fields; every problem is one ConfigError line naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (byte {e.start} is not UTF-8)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: "
                          f"{getattr(e, 'problem', None) or e}") from None
    if overrides and isinstance(data, dict):  # a file that is no mapping: parse_config says so
        data = apply_overrides(data, overrides, path)
        path = f"{path} (with --set {' '.join(overrides)})"
    return parse_config(data, path)
