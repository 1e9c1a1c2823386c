"""realign: the LLM (merged theta_i) and the encoders frozen, the connectors of modalities 1..i
trained on the mix of their replay shards, so they feed the merged LLM what it now expects.

The LLM gets no gradients and no optimizer state: only connector parameters reach the optimizer.
It still runs under ZeRO-3 (partitioned, gathered per layer); a frozen data-parallel copy is
faster when the LLM fits one device, and is not built yet (stages.realign.mode).
"""
from __future__ import annotations

from mera_ds.config import RunConfig
from mera_ds.errors import MeraError
from mera_ds.layout import RunLayout
from mera_ds.stages.train import JobSpec, launcher_main
from mera_ds.storage import join, read_json


def replay_pattern(layout: RunLayout, modality: str) -> tuple[str, int]:
    """(pattern, samples) of a modality's replay shards, from the replay.json written with them."""
    info = read_json(join(layout.replay_dir(modality), "replay.json"))
    return info["pattern"], info["samples"]


def realign_job(cfg: RunConfig, modality: str, llm: str, before: dict[str, str],
                replays: list[tuple[str, int]], out: dict[str, str],
                tensorboard: str | None = None) -> JobSpec:
    """Stage `modality`'s realign: the LLM directory `llm` frozen, the connectors of `before`
    ({learned modality: file to start from}) trained on the union of the replay sets
    `replays` [(pattern, samples)], which weigh by their sizes, and written to `out`."""
    ra = cfg.stages.realign
    if ra.mode != "zero3":
        raise MeraError(f"stages.realign.mode: {ra.mode!r} is not built yet; use 'zero3'")
    learned = list(before)
    return JobSpec(
        stage="realign", modality=modality, learned=learned,
        train_llm=False, train_connectors=learned,
        data=[p for p, _ in replays], data_weights=[float(n) for _, n in replays],
        settings=ra, lr_llm=0.0, lr_connector=ra.lr, init_llm=llm, init_connectors=before,
        export_connectors=out, tensorboard=tensorboard)


def realign_spec(cfg: RunConfig, modality: str) -> JobSpec:
    layout = RunLayout.of(cfg)
    learned = layout.learned(modality)
    return realign_job(
        cfg, modality, layout.stage_llm(modality),
        before={m: layout.connector_before_realign(modality, m) for m in learned},
        replays=[replay_pattern(layout, m) for m in learned],
        out={m: layout.realign_connector(modality, m) for m in learned},
        tensorboard=layout.tensorboard(modality, "realign"))


if __name__ == "__main__":
    launcher_main(realign_spec)
