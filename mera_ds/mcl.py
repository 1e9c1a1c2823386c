"""The MCL benchmark (`mera bench mcl`): MERA against the baselines of modality-incremental
continual learning, on one config, one training order and one seed, in one process.

Methods (the same model, data and hyperparameters for all: the config's):
- seq-ft: finetune on each modality in turn (the lower bound);
- seq-ft+realign: seq-ft, with the realign stage (10% replay) after each finetune;
- merge-only: MERA without realign;
- replay-10: 10% replay of the earlier modalities mixed into each finetune, all learned
  connectors trained with the LLM;
- mera-1, mera-10: finetune, merge, realign on 1% / 10% replay.

A method is a *chain* (how stage i's LLM theta_i comes from theta_{i-1}: seq keeps the finetuned
LLM, merge merges it, replay finetunes on the replay mix) plus the replay ratio of its realign
(none: the finetuned connectors are evaluated). Finetuning never sees the old connectors except in
the replay chain, so methods on one chain share its finetunes and merges, stage 1 (nothing
learned before) is one finetune for all, and stage 2 one for seq and merge (both start from
theta_1): each is computed once. Everything goes through the stage
functions the pipeline runs (run_job with one rank, merge_llm, sample_replay, evaluate) and is
recorded in OUT/manifest.json, so `--resume` continues an interrupted benchmark.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Optional

from mera_ds.config import RunConfig
from mera_ds.errors import MeraError
from mera_ds.layout import RunLayout
from mera_ds.manifest import Manifest
from mera_ds.storage import join, write_bytes

log = logging.getLogger("mera_ds.mcl")

# replay-10's share of each earlier modality mixed into finetuning, and seq-ft+realign's replay.
BASELINE_REPLAY = 0.1


@dataclass(frozen=True)
class Method:
    chain: str                 # seq | merge | replay
    realign: Optional[float]   # replay ratio of the realign after each finetune; None: no realign


METHODS = {
    "seq-ft": Method("seq", None),
    "seq-ft+realign": Method("seq", BASELINE_REPLAY),
    "merge-only": Method("merge", None),
    "replay-10": Method("replay", None),
    "mera-1": Method("merge", 0.01),
    "mera-10": Method("merge", 0.1),
}


def _pct(ratio: float) -> str:
    return f"{ratio * 100:g}"


@dataclass(frozen=True)
class BenchLayout:
    """Where the benchmark's artifacts live under OUT (its run_dir):
    OUT/chains/<chain>/NN-<modality>/{finetune,merge,realign-<r%>}/ and
    OUT/replay/<r%>/<modality>/."""

    run: RunLayout

    def chain(self, chain: str, i: int) -> str:
        """The chain of stage i: stage 1 is shared by all ("first")."""
        return "first" if i == 1 else chain

    def finetune_chain(self, chain: str, i: int) -> str:
        """Whose finetune stage i of `chain` is: merge's stage-2 finetune starts from theta_1,
        as seq's does, so it is seq's."""
        return "seq" if chain == "merge" and i == 2 else self.chain(chain, i)

    def stage_dir(self, chain: str, i: int) -> str:
        m = self.run.order[i - 1]
        return join(self.run.run_dir, "chains", self.chain(chain, i), f"{i:02d}-{m}")

    def finetune_dir(self, chain: str, i: int) -> str:
        return join(self.stage_dir(self.finetune_chain(chain, i), i), "finetune")

    def finetune_llm(self, chain: str, i: int) -> str:
        return join(self.finetune_dir(chain, i), "llm")

    def finetune_connector(self, chain: str, i: int, modality: str) -> str:
        return join(self.finetune_dir(chain, i), "connectors", f"{modality}.safetensors")

    def merge_llm(self, chain: str, i: int) -> str:
        return join(self.stage_dir(chain, i), "merge", "llm")

    def llm(self, chain: str, i: int) -> str:
        """theta_i of a chain."""
        return self.merge_llm(chain, i) if chain == "merge" and i > 1 else \
            self.finetune_llm(chain, i)

    def realign_dir(self, chain: str, ratio: float, i: int) -> str:
        return join(self.stage_dir(chain, i), f"realign-{_pct(ratio)}")

    def replay_dir(self, ratio: float, modality: str) -> str:
        return join(self.run.run_dir, "replay", _pct(ratio), modality)

    def connectors(self, method: Method, i: int) -> dict[str, str]:
        """The connectors evaluated with theta_i: realigned, or each as its finetune left it."""
        learned = self.run.order[:i]
        if method.realign is not None:
            d = self.realign_dir(method.chain, method.realign, i)
            return {m: join(d, f"{m}.safetensors") for m in learned}
        if method.chain == "replay":  # its finetune trains every learned connector
            return {m: self.finetune_connector("replay", i, m) for m in learned}
        return {m: self.finetune_connector(method.chain, k, m) for k, m in enumerate(learned, 1)}


def bench_config(cfg: RunConfig, order: Optional[list[str]], seed: Optional[int],
                 out: str) -> RunConfig:
    """The benchmark's config: `cfg` with its modalities in `order`, `seed`, `out` as run
    directory, and one worker (one process) taking each batch whole: gradient accumulation over
    micro-batches only saves memory, which the tiny models do not need, and halves the speed."""
    from mera_ds.config import absolute

    if cfg.stages.align.enabled:
        raise MeraError("stages.align.enabled: the MCL benchmark compares methods without the "
                        "align stage; disable it in the config")
    modalities = cfg.modalities
    if order:
        known = [m.name for m in cfg.modalities]
        unknown = [m for m in order if m not in known]
        if unknown:
            raise MeraError(f"--order: modality {unknown[0]!r} is not in the config "
                            f"({', '.join(known)})")
        if len(set(order)) != len(order):
            raise MeraError(f"--order: a modality appears twice in {','.join(order)}")
        modalities = [cfg.modality(m) for m in order]
    if len(modalities) < 2:
        raise MeraError("--order: the benchmark needs at least two modalities")
    whole = {name: getattr(cfg.stages, name).model_copy(
        update={"micro_batch_size": getattr(cfg.stages, name).batch_size})
        for name in ("finetune", "realign")}
    return cfg.model_copy(update={
        "modalities": modalities, "run_dir": absolute(out),
        "seed": cfg.seed if seed is None else seed,
        "stages": cfg.stages.model_copy(update=whole),
        "cluster": cfg.cluster.model_copy(update={"num_workers": 1})})


def run_mcl(cfg: RunConfig, methods: Optional[list[str]] = None, resume: bool = False) -> dict:
    """Run the methods (default: all) over the config's modalities, in order; return
    {"order", "seed", "methods": {name: {"P", "brg", "final_average", "seconds"}}, "seconds"}.
    A method's `seconds`: what its stages took (shared ones included), as if it ran alone; the
    top-level `seconds`: this call's wall time, shared stages counted once."""
    from mera_ds.data.replay import sample_replay
    from mera_ds.stages.evaluate import backward_relative_gain, evaluate, performance_matrix
    from mera_ds.stages.merge import merge_llm
    from mera_ds.stages.finetune import finetune_job
    from mera_ds.stages.realign import realign_job
    from mera_ds.stages.train import JobSpec, run_job

    names = methods or list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise MeraError(f"--methods: {unknown[0]!r} is not one of {', '.join(METHODS)}")
    b = BenchLayout(RunLayout.of(cfg))
    order = list(b.run.order)
    manifest = Manifest.open(cfg, resume)
    device = "cuda" if cfg.cluster.use_gpu else "cpu"
    t0 = time.time()
    deps: dict[str, list[str]] = {n: [] for n in names}  # manifest stages each method uses

    def stage(name: str, users, outputs: list[str], fn, *args, **kwargs) -> dict:
        for n in users:
            deps[n].append(name)
        return manifest.run(name, outputs, fn, *args, **kwargs)

    def replay(ratio: float, m: str) -> dict:
        users = [n for n in names if METHODS[n].realign == ratio or
                 (METHODS[n].chain == "replay" and ratio == BASELINE_REPLAY)]
        out = b.replay_dir(ratio, m)
        return stage(f"replay/{_pct(ratio)}/{m}", users, [out], sample_replay,
                     cfg.modality(m).train_shards, out, ratio, cfg.seed, num_shards=1)

    def train(name: str, users, outputs: list[str], spec: JobSpec) -> None:
        r = stage(name, users, outputs, run_job, cfg, spec)
        log.info("%s: loss %.3f -> %.3f", name, r["first_loss"], r["loss"])

    rows: dict[str, list[dict]] = {n: [] for n in names}
    for i, modality in enumerate(order, 1):
        tag, learned = f"{i:02d}-{modality}", order[:i]
        key = {n: (b.chain(METHODS[n].chain, i), METHODS[n].realign) for n in names}

        for chain in sorted({b.finetune_chain(c, i) for c, _ in key.values()}):
            users = [n for n in names if b.finetune_chain(key[n][0], i) == chain]
            if chain == "replay":  # the new modality's data plus the earlier ones' replay
                mix = [replay(BASELINE_REPLAY, m) for m in learned]
                data = [cfg.modality(modality).train_shards] + [r["pattern"] for r in mix[:-1]]
                weights = [float(mix[-1]["source_samples"])] + [float(r["samples"])
                                                               for r in mix[:-1]]
                trained = learned
                init = {m: b.finetune_connector("replay", i - 1, m) for m in learned[:-1]}
            else:
                data, weights, trained, init = \
                    [cfg.modality(modality).train_shards], None, [modality], {}
            train(f"{chain}/{tag}/finetune", users, [b.finetune_dir(chain, i)], finetune_job(
                cfg, modality, b.llm(chain, i - 1) if i > 1 else cfg.llm.path, data=data,
                data_weights=weights, connectors=init, out_llm=b.finetune_llm(chain, i),
                out_connectors={m: b.finetune_connector(chain, i, m) for m in trained}))
        if i > 1 and any(c == "merge" for c, _ in key.values()):
            stage(f"merge/{tag}/merge", [n for n in names if key[n][0] == "merge"],
                  [b.merge_llm("merge", i)], merge_llm, b.llm("merge", i - 1),
                  [b.finetune_llm("merge", i)], b.merge_llm("merge", i), cfg.stages.merge,
                  step=i)

        results = {}
        for chain, ratio in sorted(set(key.values()), key=str):
            users = [n for n in names if key[n] == (chain, ratio)]
            suffix = "" if ratio is None else f"-{_pct(ratio)}"
            if ratio is not None:
                mix = [replay(ratio, m) for m in learned]
                out = b.realign_dir(chain, ratio, i)
                train(f"{chain}/{tag}/realign{suffix}", users, [out], realign_job(
                    cfg, modality, b.llm(chain, i),
                    before={m: b.finetune_connector(chain, i, m) if m == modality
                            else join(b.realign_dir(chain, ratio, i - 1), f"{m}.safetensors")
                            for m in learned},
                    replays=[(r["pattern"], r["samples"]) for r in mix],
                    out={m: join(out, f"{m}.safetensors") for m in learned}))
            results[chain, ratio] = stage(
                f"{chain}/{tag}/evaluate{suffix}", users, [], evaluate, cfg, modality,
                llm_dir=b.llm(chain, i), connectors=b.connectors(Method(chain, ratio), i),
                device=device)
        for n in names:
            rows[n].append(results[key[n]])
        log.info("stage %s done, %.0f s so far", tag, time.time() - t0)

    out = {"order": order, "seed": cfg.seed, "methods": {}, "seconds": time.time() - t0}
    for n in names:
        _, P = performance_matrix(rows[n])
        out["methods"][n] = {
            "P": P, "brg": backward_relative_gain(P, order),
            "final_average": sum(P[-1]) / len(P[-1]),
            "seconds": sum(manifest.stages[s]["seconds"] for s in dict.fromkeys(deps[n]))}
    return out


# --- output -------------------------------------------------------------------------------------

def format_table(result: dict, matrix: bool = False) -> str:
    from mera_ds.report import format_matrix

    lines = [f"MCL benchmark: order {','.join(result['order'])}, seed {result['seed']}",
             f"{'method':<16}{'BRG %':>9}{'final avg':>11}{'seconds':>9}"]
    for n, r in result["methods"].items():
        brg = "n/a" if r["brg"] is None else f"{r['brg']:.2f}"
        lines.append(f"{n:<16}{brg:>9}{r['final_average']:>11.3f}{r['seconds']:>9.0f}")
    lines.append(f"wall time {result['seconds']:.0f} s (shared stages run once)")
    if matrix:
        for n, r in result["methods"].items():
            lines += ["", n, format_matrix(result["order"], r["P"])]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """BRG and the final average per method, as a bar chart (PNG at `path`, local or s3://)."""
    import io

    from matplotlib.figure import Figure

    names = list(result["methods"])
    brg = [result["methods"][n]["brg"] or 0.0 for n in names]
    avg = [100 * result["methods"][n]["final_average"] for n in names]
    fig = Figure(figsize=(8, 4), dpi=120)
    ax = fig.add_subplot()
    x = range(len(names))
    ax.bar([k - 0.2 for k in x], brg, width=0.4, label="BRG %")
    ax.bar([k + 0.2 for k in x], avg, width=0.4, label="final average x 100")
    ax.axhline(100, color="0.5", linewidth=0.8)
    ax.set_xticks(list(x), names, rotation=20)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"MCL benchmark: {','.join(result['order'])}, seed {result['seed']}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes(path, buf.getvalue())


def summarize(results: list[dict]) -> str:
    """Mean, standard deviation and range of BRG and the final average per method over runs
    (orders x seeds), as a Markdown table."""
    found = {n for r in results for n in r["methods"]}  # JSON keeps no order: METHODS's
    names = [n for n in METHODS if n in found] + sorted(found - set(METHODS))
    runs = ", ".join(f"{','.join(r['order'])}/s{r['seed']}" for r in results)
    lines = [f"{len(results)} runs: {runs}", "",
             "| method | BRG % mean | BRG sd | BRG min..max | final avg mean | final avg sd |",
             "|---|---|---|---|---|---|"]
    for n in names:
        brg = [r["methods"][n]["brg"] for r in results
               if n in r["methods"] and r["methods"][n]["brg"] is not None]
        avg = [r["methods"][n]["final_average"] for r in results if n in r["methods"]]
        sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
        lines.append(f"| {n} | {statistics.mean(brg):.2f} | {sd(brg):.2f} | "
                     f"{min(brg):.2f}..{max(brg):.2f} | {statistics.mean(avg):.3f} | "
                     f"{sd(avg):.3f} |")
    return "\n".join(lines)
