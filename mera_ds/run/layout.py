"""Where a run's artifacts live, for a local path or an s3:// prefix: the one place that names
them. The plan, the executors, the report and the benchmark take every path from here.

    RUN/manifest.json                          the steps done, the order, the config
    RUN/base/llm/                              theta_0, HF layout (merges across stages only)
    RUN/stages/NN-<modality>/align/connectors/<modality>.safetensors
    RUN/stages/NN-<modality>/finetune/llm/     HF layout
    RUN/stages/NN-<modality>/finetune/connectors/<modality>.safetensors
    RUN/stages/NN-<modality>/finetune/fisher/  HF layout, float32 (EWC's, of the LLM beside it)
    RUN/stages/NN-<modality>/merge/llm/        HF layout (stage 1 has none)
    RUN/stages/NN-<modality>/realign/connectors/<modality>.safetensors (every learned; stage 1 none)
    RUN/stages/NN-<modality>/realign/coefficients.json   (a learned merge's, strategy ada)
    RUN/stages/NN-<modality>/eval/metrics.json
    RUN/replay/<modality>/replay-NNNNNN.tar, replay.json
    RUN/tensorboard/NN-<modality>-<phase>/
    RUN/report/
    RUN/logs/mera.log                          the `mera` command's own log
    RUN/logs/<step>/rank-<r>.log               a step's output, per rank (02-video-finetune/)
    RUN/mcl.json, mcl.png                      (a benchmark's results)

A benchmark runs several methods in one directory: each *chain* (how theta_i comes from
theta_{i-1}) has its stages under RUN/chains/<chain>/NN-<modality>/, and realigns, evaluations
and replays at several replay ratios are told apart by a tag ("-10" for 10%): realign-10/,
eval-10/, RUN/replay-10/<modality>/.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from mera_ds.config import RunConfig
from mera_ds.storage import join


@dataclass(frozen=True)
class RunLayout:
    run_dir: str
    order: tuple[str, ...]        # modalities in training order
    chain: Optional[str] = None   # a benchmark's chain; None: a run's single one

    @classmethod
    def of(cls, cfg: RunConfig) -> "RunLayout":
        """A run's layout: its run_dir, its modalities in the config's order."""
        return cls(cfg.run_dir.rstrip("/"), tuple(m.name for m in cfg.modalities))

    def of_chain(self, chain: Optional[str]) -> "RunLayout":
        return dataclasses.replace(self, chain=chain)

    def stage(self, modality: str) -> int:
        """1-based stage number of a modality: the i of the paper's merge formula."""
        return self.order.index(modality) + 1

    def stage_name(self, modality: str) -> str:
        """"NN-<modality>", e.g. "02-video"."""
        return f"{self.stage(modality):02d}-{modality}"

    def step_name(self, modality: str, phase: str, tag: str = "") -> str:
        """The name of a step in the manifest and the logs: "02-video/finetune" in a run,
        "merge/02-video/realign-10" in a benchmark."""
        prefix = f"{self.chain}/" if self.chain else ""
        return f"{prefix}{self.stage_name(modality)}/{phase}{tag}"

    @property
    def stages_dir(self) -> str:
        """RUN/stages, or a benchmark chain's RUN/chains/<chain>."""
        return join(self.chains_dir, self.chain) if self.chain else join(self.run_dir, "stages")

    @property
    def chains_dir(self) -> str:
        return join(self.run_dir, "chains")

    def stage_dir(self, modality: str) -> str:
        return join(self.stages_dir, self.stage_name(modality))

    def phase_dir(self, modality: str, phase: str, tag: str = "") -> str:
        return join(self.stage_dir(modality), phase + tag)

    def align_connector(self, modality: str) -> str:
        return join(self.phase_dir(modality, "align"), "connectors", f"{modality}.safetensors")

    def finetune_llm(self, modality: str) -> str:
        return join(self.phase_dir(modality, "finetune"), "llm")

    def finetune_connector(self, modality: str, connector_of: Optional[str] = None) -> str:
        """A connector a stage's finetune wrote: its own modality's, unless it trained several."""
        return join(self.phase_dir(modality, "finetune"), "connectors",
                    f"{connector_of or modality}.safetensors")

    def fisher(self, modality: str) -> str:
        """EWC's Fisher of the stage's finetuned LLM, summed with the earlier stages'."""
        return join(self.phase_dir(modality, "finetune"), "fisher")

    @property
    def base_llm(self) -> str:
        """theta_0, the LLM before the first modality, as the run sees it (its tokenizer with
        the placeholder token): the anchor of merges across stages."""
        return join(self.run_dir, "base", "llm")

    def merge_llm(self, modality: str) -> str:
        return join(self.phase_dir(modality, "merge"), "llm")

    def realign_connector(self, modality: str, connector_of: str, tag: str = "") -> str:
        return join(self.phase_dir(modality, "realign", tag), "connectors",
                    f"{connector_of}.safetensors")

    def merge_coefficients(self, modality: str, tag: str = "") -> str:
        """The coefficients a learned merge's realign fitted (strategy ada)."""
        return join(self.phase_dir(modality, "realign", tag), "coefficients.json")

    def eval_metrics(self, modality: str, tag: str = "") -> str:
        return join(self.phase_dir(modality, "eval", tag), "metrics.json")

    def replay_dir(self, modality: str, tag: str = "") -> str:
        return join(self.run_dir, "replay" + tag, modality)

    def train_state(self, modality: str, phase: str, tag: str = "") -> str:
        """Resumable training state (DeepSpeed checkpoints) of a running job; not an artifact."""
        return join(self.phase_dir(modality, phase, tag), "_state")

    def tensorboard(self, modality: str, phase: str, tag: str = "") -> str:
        prefix = f"{self.chain}-" if self.chain else ""
        return join(self.run_dir, "tensorboard",
                    f"{prefix}{self.stage_name(modality)}-{phase}{tag}")

    @property
    def driver_log(self) -> str:
        """The `mera` command's own log: everything -v shows."""
        return join(self.run_dir, "logs", "mera.log")

    def step_log(self, step: str, rank: int = 0) -> str:
        """The output of rank `rank` of step `step` (a process of it: a Ray Train worker, a
        launcher's rank, a task): "02-video/finetune" -> RUN/logs/02-video-finetune/rank-1.log."""
        return join(self.run_dir, "logs", step.replace("/", "-"), f"rank-{rank}.log")

    @property
    def manifest(self) -> str:
        return join(self.run_dir, "manifest.json")

    @property
    def report_dir(self) -> str:
        return join(self.run_dir, "report")

    @property
    def mcl_results(self) -> str:
        """A benchmark's results (`mera bench mcl`), JSON."""
        return join(self.run_dir, "mcl.json")

    @property
    def mcl_plot(self) -> str:
        return join(self.run_dir, "mcl.png")
