"""The three training jobs of a stage, as JobSpecs: what trains, at which learning rate, on which
data, starting from and exporting to which artifacts. The plan (mera_ds.run.plan) says which
artifacts those are; `where` carries the step's name, TensorBoard directory and resume state.

- align: connector_i alone on caption-style data, the LLM frozen (LLaVA's stage 1);
- finetune: the whole LLM (or LoRA adapters on it) and the connectors it writes, from
  theta_{i-1};
- realign: the connectors of every learned modality on their replay, the merged LLM frozen;
- fisher: no training: EWC's Fisher of a finetuned LLM on its training data
  (mera_ds.train.ewc).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

from mera_ds.config import RunConfig
from mera_ds.data.replay import ReplaySet
from mera_ds.train.recipe import JobSpec


def align_job(cfg: RunConfig, modality: str, llm: Optional[str], out: str, **where) -> JobSpec:
    """Connector `modality` trained alone, on its align data, into file `out`; the LLM directory
    `llm` (None: the config's) frozen."""
    m, al = cfg.modality(modality), cfg.stages.align
    return JobSpec(
        phase="align", modality=modality, learned=(modality,), train_llm=False,
        train_connectors=(modality,), data=(m.align_shards or m.train_shards,), settings=al,
        lr_llm=0.0, lr_connector=al.lr, init_llm=llm, export_connectors={modality: out},
        **where)


def finetune_job(cfg: RunConfig, modality: str, llm: Optional[str],
                 data: Sequence[Union[str, ReplaySet]], init_connectors: dict[str, str],
                 out_llm: str, out_connectors: dict[str, str], lwf: bool = False,
                 fisher: Optional[str] = None, **where) -> JobSpec:
    """The whole LLM (directory `llm`; None: the config's) and the connectors of `out_connectors`
    trained on `data`; `init_connectors` gives files some of them start from (the others start
    fresh). `lwf`: distilling from `llm`; `fisher`: with EWC's penalty toward `llm`, weighed by
    that Fisher directory."""
    ft = cfg.stages.finetune
    trained = tuple(out_connectors)
    return JobSpec(
        phase="finetune", modality=modality, learned=trained, train_llm=True,
        train_connectors=trained, data=tuple(data), settings=ft, lr_llm=ft.lr_llm,
        lr_connector=ft.lr_connector, init_llm=llm, init_connectors=init_connectors,
        export_llm=out_llm, export_connectors=out_connectors, lora=ft.lora, lwf=lwf,
        fisher=fisher, **where)


def fisher_job(cfg: RunConfig, modality: str, llm: str, connector: str,
               earlier: Optional[str], out: str, **where) -> JobSpec:
    """EWC's Fisher of the finetuned LLM directory `llm` (with its connector file `connector`)
    on the modality's training data, over stages.finetune.ewc_batches batches of its batch
    size, plus the Fisher directory `earlier` (None: the first), written to `out`. Gradients
    reach every weight of the LLM, whether its finetune trained them or LoRA adapters."""
    ft = cfg.stages.finetune
    return JobSpec(
        phase="fisher", modality=modality, learned=(modality,), train_llm=True,
        train_connectors=(), data=(cfg.modality(modality).train_shards,),
        settings=ft.model_copy(update={"steps": ft.ewc_batches}), lr_llm=0.0, lr_connector=0.0,
        init_llm=llm, init_connectors={modality: connector}, fisher=earlier, export_fisher=out,
        **where)


def realign_job(cfg: RunConfig, modality: str, llm: str, before: dict[str, str],
                replays: Sequence[ReplaySet], out: dict[str, str],
                merge_finetuned: Sequence[str] = (), export_coefficients: Optional[str] = None,
                **where) -> JobSpec:
    """The LLM directory `llm` frozen, the connectors of `before` ({learned modality: file to
    start from}) trained on the union of the replay sets, weighed by their sizes, and written to
    `out`. Only connector parameters reach the optimizer; the LLM still runs under ZeRO-3.
    With `merge_finetuned` (theta_ft_1..i; `llm` theta_0) the coefficients of a learned merge
    over their task vectors train too (stages.merge.ada_lr), written to `export_coefficients`."""
    ra = cfg.stages.realign
    learned = tuple(before)
    return JobSpec(
        phase="realign", modality=modality, learned=learned, train_llm=False,
        train_connectors=learned, data=tuple(replays), settings=ra, lr_llm=0.0,
        lr_connector=ra.lr, init_llm=llm, init_connectors=before, export_connectors=out,
        merge_finetuned=tuple(merge_finetuned), lr_merge=cfg.stages.merge.ada_lr,
        export_coefficients=export_coefficients, **where)
