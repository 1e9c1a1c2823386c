"""finetune: train the whole LLM and connector_i on modality i, starting from theta_{i-1}.

Output: theta_ft_i (the "vanilla" LLM, HF layout) and connector_i. Under ZeRO-3.
"""
from __future__ import annotations

from mera_ds.config import RunConfig
from mera_ds.layout import RunLayout
from mera_ds.stages.train import JobSpec, launcher_main


def finetune_job(cfg: RunConfig, modality: str, llm: str | None, data: list[str],
                 connectors: dict[str, str], out_llm: str, out_connectors: dict[str, str],
                 data_weights: list[float] | None = None,
                 tensorboard: str | None = None) -> JobSpec:
    """Stage `modality`'s finetune: the whole LLM (directory `llm`; None: the config's) and
    the connectors of `out_connectors` trained on `data` (shard patterns, mixed by
    `data_weights`); `connectors` gives files some of them start from (the others start fresh)."""
    ft = cfg.stages.finetune
    trained = list(out_connectors)
    return JobSpec(
        stage="finetune", modality=modality, learned=trained,
        train_llm=True, train_connectors=trained, data=data, data_weights=data_weights,
        settings=ft, lr_llm=ft.lr_llm, lr_connector=ft.lr_connector,
        init_llm=llm, init_connectors=connectors,
        export_llm=out_llm, export_connectors=out_connectors, tensorboard=tensorboard)


def finetune_spec(cfg: RunConfig, modality: str) -> JobSpec:
    layout = RunLayout.of(cfg)
    return finetune_job(
        cfg, modality, layout.llm_before(modality, cfg.llm.path),
        data=[cfg.modality(modality).train_shards],
        connectors=({modality: layout.align_connector(modality)}
                    if cfg.stages.align.enabled else {}),
        out_llm=layout.finetune_llm(modality),
        out_connectors={modality: layout.finetune_connector(modality)},
        tensorboard=layout.tensorboard(modality, "finetune"))


if __name__ == "__main__":
    launcher_main(finetune_spec)
