"""Where a run's artifacts live (DESIGN.md, "Storage layout of one run"), for a local path or an
s3:// prefix. Every stage and the driver take their paths from here, never by hand."""
from __future__ import annotations

from dataclasses import dataclass

from mera_ds.config import RunConfig
from mera_ds.storage import join


@dataclass(frozen=True)
class RunLayout:
    run_dir: str
    order: tuple[str, ...]  # modalities in training order

    @classmethod
    def of(cls, cfg: RunConfig) -> "RunLayout":
        return cls(cfg.run_dir.rstrip("/"), tuple(m.name for m in cfg.modalities))

    def index(self, modality: str) -> int:
        """1-based stage number of a modality: the i of the paper's merge formula."""
        return self.order.index(modality) + 1

    def stage_dir(self, modality: str) -> str:
        return join(self.run_dir, "stages", f"{self.index(modality):02d}-{modality}")

    def previous(self, modality: str) -> str | None:
        i = self.index(modality)
        return self.order[i - 2] if i > 1 else None

    def learned(self, modality: str) -> tuple[str, ...]:
        """Modalities learned up to and including this stage."""
        return self.order[: self.index(modality)]

    def align_connector(self, modality: str) -> str:
        return join(self.stage_dir(modality), "align", "connectors", f"{modality}.safetensors")

    def finetune_llm(self, modality: str) -> str:
        return join(self.stage_dir(modality), "finetune", "llm")

    def finetune_connector(self, modality: str) -> str:
        return join(self.stage_dir(modality), "finetune", "connectors", f"{modality}.safetensors")

    def merge_llm(self, modality: str) -> str:
        return join(self.stage_dir(modality), "merge", "llm")

    def stage_llm(self, modality: str) -> str:
        """theta_i: the LLM a stage ends with (stage 1 has no merge: its LLM is the finetuned)."""
        return self.finetune_llm(modality) if self.index(modality) == 1 else self.merge_llm(modality)

    def llm_before(self, modality: str, base: str | None) -> str | None:
        """The LLM a stage's training starts from: theta_{i-1}, or `base` (the configured LLM)
        for the first modality."""
        prev = self.previous(modality)
        return self.stage_llm(prev) if prev else base

    def realign_connector(self, modality: str, connector_of: str) -> str:
        return join(self.stage_dir(modality), "realign", "connectors",
                    f"{connector_of}.safetensors")

    def connector_before_realign(self, modality: str, connector_of: str) -> str:
        """Where stage `modality`'s realign starts connector `connector_of` from: the newest
        modality's finetuned connector, the others' as the previous stage's realign left them."""
        if connector_of == modality:
            return self.finetune_connector(modality)
        return self.realign_connector(self.previous(modality), connector_of)

    def eval_metrics(self, modality: str) -> str:
        return join(self.stage_dir(modality), "eval", "metrics.json")

    def replay_dir(self, modality: str) -> str:
        return join(self.run_dir, "replay", modality)

    def train_state(self, modality: str, stage: str) -> str:
        """Resumable training state (DeepSpeed checkpoints) of a running job; not an artifact."""
        return join(self.stage_dir(modality), stage, "_state")

    def tensorboard(self, modality: str, stage: str) -> str:
        return join(self.run_dir, "tensorboard", f"{self.index(modality):02d}-{modality}-{stage}")

    @property
    def manifest(self) -> str:
        return join(self.run_dir, "manifest.json")

    @property
    def report_dir(self) -> str:
        return join(self.run_dir, "report")
