"""The exported final MLLM (`mera export`): one self-contained directory, local or s3://, that
`mera predict` loads without the run it came from.

    DIR/mera_model.json                     what ties the pieces (below); written last
    DIR/llm/                                the final LLM, HF layout, copied
    DIR/connectors/<modality>.safetensors   one per modality, copied

The final LLM and connectors are those of the run's last evaluate step (the plan's EvalSpec):
exactly the model whose scores the run reports. Encoders are frozen and never trained, so they
are not copied: mera_model.json keeps each one's config (a built-in tiny one is rebuilt from its
seed, a pretrained one is loaded from its `path`, a reference).
"""
from __future__ import annotations

import shutil
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mera_ds.config import ConnectorConfig, EncoderConfig, LLMConfig, TaskConfig, storage_url
from mera_ds.errors import MeraError
from mera_ds.storage import (accessing, committed_dir, exists, join, open_url, read_json,
                             url_to_fs, write_bytes)

FILE = "mera_model.json"
FORMAT = "mera-model"
VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConnectorFile(ConnectorConfig):
    file: str = Field(description="relative to the bundle directory")


class BundleModality(_Strict):
    name: str
    encoder: EncoderConfig
    connector: ConnectorFile
    task: TaskConfig


class Source(_Strict):
    """Where the model came from: the run, its config, the step that evaluated it, its scores."""

    run_dir: str
    config_digest: str
    eval_step: str
    scores: dict[str, float]
    samples: dict[str, int]


class Bundle(_Strict):
    """mera_model.json. `llm.path` is relative to the bundle directory."""

    format: Literal[FORMAT] = FORMAT
    version: Literal[VERSION] = VERSION
    llm: LLMConfig
    modalities: list[BundleModality] = Field(min_length=1, description="in training order")
    source: Source


# --- export -------------------------------------------------------------------------------------

def export(run_dir: str, out: str, force: bool = False) -> Bundle:
    """Write the final MLLM of the run in `run_dir` to the directory `out`; returns its
    mera_model.json. Refuses a run whose last evaluate step is not recorded as finished, and an
    existing `out` unless `force`."""
    from mera_ds.run import manifest
    from mera_ds.run.plan import Method, plan
    from mera_ds.run.report import run_layout

    layout = run_layout(run_dir)
    out = directory_url(out, "output directory")
    recorded = manifest.read(layout.manifest)
    cfg = recorded.config()
    final = plan(cfg, Method.of(cfg), layout)[-1]
    if final.name not in recorded.steps:
        raise MeraError(f"{layout.run_dir}: its final evaluation ({final.name}) is not recorded "
                        f"as finished in {layout.manifest}; finish the run first (mera run "
                        f"CONFIG --resume)")
    spec, result = final.spec, recorded.steps[final.name]["result"]
    bundle = Bundle(
        llm=cfg.llm.model_copy(update={"path": "llm"}),
        modalities=[BundleModality(name=m, encoder=cfg.modality(m).encoder,
                                   connector=ConnectorFile(type=cfg.modality(m).connector.type,
                                                           file=f"connectors/{m}.safetensors"),
                                   task=cfg.modality(m).task) for m in layout.order],
        source=Source(run_dir=layout.run_dir, config_digest=cfg.digest(), eval_step=final.name,
                      scores={m: result["scores"][m] for m in layout.order},
                      samples={m: result["samples"][m] for m in layout.order}))
    with committed_dir(out, overwrite=force) as tmp:
        _copy_dir(spec.llm, join(tmp, bundle.llm.path))
        for m in bundle.modalities:
            _copy_file(spec.connectors[m.name], join(tmp, m.connector.file))
        # Last: it marks the bundle whole. (llm.tiny: a tiny LLM's overrides, none once saved.)
        write_bytes(join(tmp, FILE), bundle.model_dump_json(
            indent=2, exclude={"llm": {"tiny"}}).encode())
    return bundle


def _copy_dir(src: str, dst: str) -> None:
    """Every file under `src` to the same place under `dst` (either local or s3://), the HF
    index last: on S3 a model directory is complete once its index is there."""
    fs, root = url_to_fs(src)
    root = root.rstrip("/")
    with accessing(src):
        files = fs.find(root)
    if not files:
        raise MeraError(f"{src}: no such model directory")
    for path in sorted(files, key=lambda p: (p.endswith(".index.json"), p)):
        rel = path[len(root) + 1:]
        _copy_file(join(src, rel), join(dst, rel))


def _copy_file(src: str, dst: str) -> None:
    try:
        with open_url(src, "rb") as f, open_url(dst, "wb") as g:
            shutil.copyfileobj(f, g, 16 << 20)
    except FileNotFoundError:
        raise MeraError(f"{src}: no such file") from None


# --- read and load ------------------------------------------------------------------------------

def directory_url(url: str, what: str) -> str:
    """A local path (made absolute: a relative one would be taken for a hub id) or s3:// URL."""
    try:
        return storage_url(url, what).rstrip("/")
    except ValueError as e:
        raise MeraError(f"{url}: {e}") from None


def read(url: str) -> Bundle:
    """The mera_model.json of the bundle directory `url`, checked."""
    url = directory_url(url, "model directory")
    path = join(url, FILE)
    if not exists(path):
        raise MeraError(f"{url}: no {FILE}; not an exported model (mera export RUN --out DIR)")
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise MeraError(f"{path}: not a {FILE} (no \"format\": \"{FORMAT}\")")
    try:
        return Bundle.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise MeraError(f"{path}: {loc.lstrip('.') or '(top level)'}: {msg}") from None


def load(url: str, device: str = "cpu"):
    """(mllm, bundle): the exported model at `url`, on `device`, in eval mode."""
    from mera_ds.model.connectors import build_connector, load_connector
    from mera_ds.model.encoders import build_encoder
    from mera_ds.model.llm import build_llm
    from mera_ds.model.mllm import MLLM

    url = directory_url(url, "model directory")
    bundle = read(url)
    llm_cfg = bundle.llm.model_copy(update={"path": join(url, bundle.llm.path)})
    llm, tokenizer = build_llm(llm_cfg)
    hidden = llm.config.get_text_config().hidden_size
    encoders, connectors = {}, {}
    for m in bundle.modalities:
        encoders[m.name] = build_encoder(m.name, m.encoder)
        connectors[m.name] = build_connector(m.connector.type, encoders[m.name].out_dim, hidden)
        load_connector(connectors[m.name], join(url, m.connector.file))
    mllm = MLLM(llm, tokenizer, encoders, connectors, bundle.llm.max_length)
    return mllm.to(device).eval(), bundle
