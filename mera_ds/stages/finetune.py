"""finetune: train the whole LLM and connector_i on modality i, starting from theta_{i-1}.

Output: theta_ft_i (the "vanilla" LLM, HF layout) and connector_i. Under ZeRO-3.
"""
from __future__ import annotations

from mera_ds.config import RunConfig
from mera_ds.layout import RunLayout
from mera_ds.stages.train import JobSpec, launcher_main


def finetune_spec(cfg: RunConfig, modality: str) -> JobSpec:
    layout = RunLayout.of(cfg)
    m = cfg.modality(modality)
    ft = cfg.stages.finetune
    return JobSpec(
        stage="finetune", modality=modality, learned=[modality],
        train_llm=True, train_connectors=[modality], data=[m.train_shards], settings=ft,
        lr_llm=ft.lr_llm, lr_connector=ft.lr_connector,
        init_llm=layout.llm_before(modality, cfg.llm.path),
        init_connectors=({modality: layout.align_connector(modality)}
                         if cfg.stages.align.enabled else {}),
        export_llm=layout.finetune_llm(modality),
        export_connectors={modality: layout.finetune_connector(modality)},
        tensorboard=layout.tensorboard(modality, "finetune"))



if __name__ == "__main__":
    launcher_main(finetune_spec)
