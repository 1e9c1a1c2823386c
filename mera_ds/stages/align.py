"""align (optional): train connector_i alone on caption-style data; the LLM (theta_{i-1}, or the
configured LLM for the first modality) stays frozen. LLaVA's stage-1 recipe."""
from __future__ import annotations

from mera_ds.config import RunConfig
from mera_ds.layout import RunLayout
from mera_ds.stages.train import JobSpec, launcher_main


def align_spec(cfg: RunConfig, modality: str) -> JobSpec:
    layout = RunLayout.of(cfg)
    m = cfg.modality(modality)
    al = cfg.stages.align
    return JobSpec(
        stage="align", modality=modality, learned=[modality],
        train_llm=False, train_connectors=[modality], data=[m.align_shards or m.train_shards],
        settings=al, lr_llm=0.0, lr_connector=al.lr,
        init_llm=layout.llm_before(modality, cfg.llm.path),
        export_connectors={modality: layout.align_connector(modality)},
        tensorboard=layout.tensorboard(modality, "align"))


if __name__ == "__main__":
    launcher_main(align_spec)
