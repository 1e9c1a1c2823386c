"""The plan of a run: from (config, method, layout), the steps of every stage in order, each with
its inputs and outputs. Executors run it (mera_ds.run.local in this process,
mera_ds.cluster.executor on Ray); neither knows how a stage is wired, only how to run a step.

A stage i (the modality m_i) has up to seven phases, in this order:

    base      theta_0 written as the run sees it     (stage 1, when merges span the stages)
    align     connector_i alone, LLM theta_{i-1} frozen          (optional)
    replay    r% of m_i's training samples, kept for realigns    (when a later step needs it)
    finetune  LLM + connector_i from theta_{i-1}                 -> theta_ft_i
    fisher    EWC's Fisher of theta_ft_i on m_i, plus stage i-1's  (EWC, before the last stage)
    merge     theta_i = theta_{i-1} + (theta_ft_i - theta_{i-1}) / i   (i >= 2, merge chain)
              or, across stages, a strategy over the task vectors theta_ft_k - theta_0, k <= i
    realign   connectors 1..i on the replay mix, theta_i frozen  (i >= 2, when the method
              realigns: at stage 1 nothing was merged)
    evaluate  every learned modality on theta_i                  -> row i of P

A learned merge (strategy ada, mera_ds.model.ada) realigns before it merges: the realign fits the
coefficients of theta_0 + sum_k lambda_k (theta_ft_k - theta_0) with the connectors, the LLM's
weights frozen, and the merge then writes that LLM.

A *method* is a variant of that plan: its chain says how theta_i comes from theta_{i-1} (merge:
MERA's merge; seq: the finetuned LLM as it is; replay: finetune on the new data mixed with the
earlier modalities' replay), its realign ratio whether and on how much replay it realigns, and
`across` whether its merges combine every stage's task vector against theta_0 (with a strategy of
merge.strategies; mera over them is the paper's running average, the same model) rather than
theta_{i-1} and theta_ft_i. A seq chain's `regularizer` adds a replay-free one to its finetunes
from stage 2 on, toward theta_{i-1}: lwf distils from it (mera_ds.model.lwf), ewc penalises the
distance to it weighed by the Fisher of the earlier stages, which a fisher step after each
finetune estimates (mera_ds.train.ewc).
`mera run` plans one method (MERA, from the config); `mera bench mcl` plans several over one
directory, where steps that compute the same thing have the same name and run once (`chained`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from mera_ds.config import RunConfig
from mera_ds.data.replay import ReplaySet
from mera_ds.errors import MeraError
from mera_ds.merge.strategies import STRATEGIES
from mera_ds.run.layout import RunLayout
from mera_ds.train.jobs import align_job, finetune_job, fisher_job, realign_job
from mera_ds.train.recipe import JobSpec

PHASES = ("base", "align", "replay", "finetune", "fisher", "merge", "realign", "evaluate")
TRAINING_PHASES = ("align", "finetune", "realign")
CHAINS = ("merge", "seq", "replay")
REGULARIZERS = ("ewc", "lwf")
# The replay chain mixes this share of each earlier modality into its finetunes.
CHAIN_REPLAY = 0.1


@dataclass(frozen=True)
class Method:
    chain: str                       # merge | seq | replay
    realign: Optional[float] = None  # replay ratio of the realign after each stage; None: none
    align: bool = False
    # The merge chain's merges: across stages with this strategy (None: theta_{i-1} and
    # theta_ft_i, with the config's).
    across: Optional[str] = None
    # The seq chain's finetunes from stage 2 on regularized toward theta_{i-1} (REGULARIZERS).
    regularizer: Optional[str] = None

    def __post_init__(self):
        if self.chain not in CHAINS:
            raise MeraError(f"method chain {self.chain!r} is not one of {', '.join(CHAINS)}")
        if self.regularizer and (self.regularizer not in REGULARIZERS or self.chain != "seq"):
            raise MeraError(f"method regularizer {self.regularizer!r}: one of "
                            f"{', '.join(REGULARIZERS)}, on the seq chain")
        if self.across and STRATEGIES[self.across].learned and self.realign is None:
            raise MeraError(f"merge strategy {self.across}: learned by the realign, which this "
                            f"method does not run")

    @classmethod
    def of(cls, cfg: RunConfig) -> "Method":
        """What `mera run` does: MERA as the config sets it."""
        ra, mg = cfg.stages.realign, cfg.stages.merge
        return cls("merge", ra.replay_ratio if ra.enabled else None, cfg.stages.align.enabled,
                   mg.strategy if mg.across_stages else None)

    @property
    def key(self) -> str:
        """Its chain's directory in a benchmark: each merge across stages and each regularizer
        is a chain of its own."""
        if self.across:
            return f"merge-{self.across}"
        return f"seq-{self.regularizer}" if self.regularizer else self.chain


class _OneOutput:
    out: str

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.out,)


@dataclass(frozen=True)
class ReplaySpec(_OneOutput):
    source: str          # the modality's training shards
    out: str             # the replay directory
    ratio: float
    seed: int
    num_shards: int      # one per rank of the largest training job

    inputs = ()          # the shards are there before the run


@dataclass(frozen=True)
class BaseSpec(_OneOutput):
    out: str                     # theta_0 as an HF directory

    inputs = ()                  # the config's LLM is there before the run


@dataclass(frozen=True)
class MergeSpec(_OneOutput):
    prev: str                    # theta_{i-1}; across stages theta_0
    finetuned: tuple[str, ...]   # theta_ft_i; across stages theta_ft_1 .. theta_ft_i
    out: str
    step: int                    # i
    strategy: Optional[str] = None  # None: the config's
    lam: Optional[float] = None     # None: the config's
    coefficients: Optional[str] = None  # a learned merge's, fitted by its realign

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.prev, *self.finetuned, *filter(None, [self.coefficients]))


@dataclass(frozen=True)
class EvalSpec(_OneOutput):
    llm: Optional[str]           # theta_i
    connectors: dict             # {learned modality: connector file}
    out: str                     # metrics.json

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(u for u in (self.llm, *self.connectors.values()) if u)


@dataclass(frozen=True)
class Step:
    name: str                    # in the manifest and the logs, e.g. "02-video/finetune"
    phase: str
    modality: str                # the stage's modality
    spec: Union[JobSpec, BaseSpec, ReplaySpec, MergeSpec, EvalSpec]

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.spec.outputs

    @property
    def inputs(self) -> tuple[str, ...]:
        """The artifacts of the run it reads (mera_ds.run.schedule orders steps by them)."""
        return self.spec.inputs


def plan(cfg: RunConfig, method: Method, layout: RunLayout, chained: bool = False) -> list[Step]:
    """The steps of `method` over the config's modalities, stage by stage, each after the steps
    whose outputs it reads."""
    p = _Planner(cfg, method, layout, chained)
    return [s for i in range(1, len(layout.order) + 1) for s in p.stage(i)]


class _Planner:
    def __init__(self, cfg: RunConfig, method: Method, layout: RunLayout, chained: bool):
        self.cfg, self.method, self.root, self.chained = cfg, method, layout, chained
        self.order = layout.order

    # Where artifacts go. In a benchmark, methods that compute the same artifact share it: every
    # chain starts with the same stage 1 ("first"), and at stage 2 the merge chain finetunes
    # theta_1 on plain data exactly as seq does, so that finetune is seq's.

    def at(self, chain: str) -> RunLayout:
        return self.root.of_chain(chain) if self.chained else self.root

    def llm_owner(self, i: int) -> str:
        return "first" if i == 1 else self.method.key

    def finetune_owner(self, i: int) -> str:
        if i == 1:
            return "first"
        return "seq" if self.method.chain == "merge" and i == 2 else self.method.key

    def tag(self, ratio: Optional[float]) -> str:
        """Tells apart the replays (and realigns) of several replay ratios in one directory."""
        several = self.chained or len(self.replay_ratios()) > 1
        return f"-{ratio * 100:g}" if several and ratio is not None else ""

    def llm(self, i: int) -> Optional[str]:
        """theta_i (theta_0: the configured LLM, None for the built-in tiny one)."""
        if i == 0:
            return self.cfg.llm.path
        m = self.order[i - 1]
        if self.method.chain == "merge" and i > 1:
            return self.at(self.method.key).merge_llm(m)
        return self.at(self.finetune_owner(i)).finetune_llm(m)

    def where(self, layout: RunLayout, m: str, phase: str, tag: str = "") -> dict:
        return dict(name=layout.step_name(m, phase, tag),
                    tensorboard=layout.tensorboard(m, phase, tag),
                    state=layout.train_state(m, phase, tag))

    def replay_ratios(self) -> list[float]:
        ratios = {self.method.realign, CHAIN_REPLAY if self.method.chain == "replay" else None}
        return sorted(r for r in ratios if r is not None)

    # The steps of stage i.

    def stage(self, i: int) -> list[Step]:
        m, cfg = self.order[i - 1], self.cfg
        steps = []
        if i == 1 and self.method.across:
            steps.append(Step(self.root.step_name(m, "base"), "base", m,
                              BaseSpec(self.root.base_llm)))
        ft = self.at(self.finetune_owner(i))
        if self.method.align:
            steps.append(_training(align_job(cfg, m, self.llm(i - 1), ft.align_connector(m),
                                             **self.where(ft, m, "align"))))
        for ratio in self.replay_ratios():
            tag = self.tag(ratio)
            steps.append(Step(self.root.step_name(m, "replay", tag), "replay", m, ReplaySpec(
                cfg.modality(m).train_shards, self.root.replay_dir(m, tag), ratio, cfg.seed,
                cfg.max_workers)))
        steps.append(self.finetune(i, ft))
        if self.method.regularizer == "ewc" and i < len(self.order):
            steps.append(self.fisher(i, ft))
        merges = self.method.chain == "merge" and i > 1
        if merges and not self.learned:
            steps.append(self.merge(i))
        if self.realigns(i):
            steps.append(self.realign(i, ft))
        if merges and self.learned:
            steps.append(self.merge(i))
        steps.append(self.evaluate(i))
        return steps

    def realigns(self, i: int) -> bool:
        """A method with a realign realigns from stage 2: at stage 1 nothing was merged, and
        connector 1 has just been trained with theta_1 on all of its data."""
        return self.method.realign is not None and i > 1

    @property
    def learned(self) -> bool:
        """Whether its merges are learned by its realigns (their coefficients)."""
        return bool(self.method.across) and STRATEGIES[self.method.across].learned

    def finetuned_llms(self, i: int) -> tuple[str, ...]:
        """theta_ft_1 .. theta_ft_i."""
        return tuple(self.at(self.finetune_owner(k)).finetune_llm(self.order[k - 1])
                     for k in range(1, i + 1))

    def finetune(self, i: int, ft: RunLayout) -> Step:
        m, learned, cfg = self.order[i - 1], self.order[:i], self.cfg
        if self.method.chain == "replay" and i > 1:
            # The new data, weighed by its size, mixed with the earlier modalities' replay; every
            # learned connector trains, the earlier ones from where the last finetune left them.
            tag, before = self.tag(CHAIN_REPLAY), self.at(self.finetune_owner(i - 1))
            data = [ReplaySet(self.root.replay_dir(m, tag), source=True)] + [
                ReplaySet(self.root.replay_dir(o, tag)) for o in learned[:-1]]
            trained = learned
            init = {o: before.finetune_connector(self.order[i - 2], o) for o in learned[:-1]}
        else:
            data, trained = [cfg.modality(m).train_shards], (m,)
            init = {m: ft.align_connector(m)} if self.method.align else {}
        regularizer = self.method.regularizer if i > 1 else None
        return _training(finetune_job(
            cfg, m, self.llm(i - 1), data, init, out_llm=ft.finetune_llm(m),
            out_connectors={o: ft.finetune_connector(m, o) for o in trained},
            lwf=regularizer == "lwf", fisher=self.fisher_dir(i - 1) if regularizer == "ewc"
            else None, **self.where(ft, m, "finetune")))

    def fisher_dir(self, i: int) -> str:
        """EWC's Fisher of stages 1..i, beside theta_ft_i."""
        return self.at(self.finetune_owner(i)).fisher(self.order[i - 1])

    def fisher(self, i: int, ft: RunLayout) -> Step:
        """EWC's Fisher of theta_ft_i on m_i's training data, plus that of the stages before:
        what the next finetune's penalty weighs by."""
        m = self.order[i - 1]
        return _training(fisher_job(
            self.cfg, m, ft.finetune_llm(m), ft.finetune_connector(m),
            self.fisher_dir(i - 1) if i > 1 else None, self.fisher_dir(i),
            **self.where(ft, m, "fisher")))

    def merge(self, i: int) -> Step:
        """theta_i from theta_{i-1} and theta_ft_i; across stages from theta_0 and every
        theta_ft_k, k <= i (the finetuned LLMs are artifacts of the run already: the task vectors
        cost no storage beyond theta_0)."""
        m, out, across = self.order[i - 1], self.at(self.method.key), self.method.across
        finetuned = self.finetuned_llms(i) if across else self.finetuned_llms(i)[-1:]
        prev = self.root.base_llm if across else self.llm(i - 1)
        lam = self.cfg.stages.merge.lam / i if across and STRATEGIES[across].sums else None
        coefficients = out.merge_coefficients(m, self.tag(self.method.realign)) \
            if self.learned else None
        return Step(out.step_name(m, "merge"), "merge", m,
                    MergeSpec(prev, finetuned, out.merge_llm(m), i, across, lam, coefficients))

    def realign(self, i: int, ft: RunLayout) -> Step:
        """Connectors 1..i on the replay mix: the newest from its finetune, the others from the
        previous stage's realign. A learned merge's (i >= 2) trains the merge coefficients over
        theta_0 and theta_ft_1..i with them."""
        m, learned = self.order[i - 1], self.order[:i]
        tag, out = self.tag(self.method.realign), self.at(self.llm_owner(i))
        before = {**self.connectors(i - 1), m: ft.finetune_connector(m)}
        merge = dict(llm=self.root.base_llm, merge_finetuned=self.finetuned_llms(i),
                     export_coefficients=out.merge_coefficients(m, tag)) \
            if self.learned and i > 1 else dict(llm=self.llm(i))
        return _training(realign_job(
            self.cfg, m, before=before, replays=[ReplaySet(self.root.replay_dir(o, tag))
                                                 for o in learned],
            out={o: out.realign_connector(m, o, tag) for o in learned},
            **merge, **self.where(out, m, "realign", tag)))

    def connectors(self, i: int) -> dict[str, str]:
        """The connectors the method ends stage i with ({learned modality: file}): realigned,
        or each as its last finetune left it."""
        m, learned = self.order[i - 1], self.order[:i]
        if self.realigns(i):
            out, tag = self.at(self.llm_owner(i)), self.tag(self.method.realign)
            return {o: out.realign_connector(m, o, tag) for o in learned}
        if self.method.chain == "replay":  # its finetunes train every learned connector
            ft = self.at(self.finetune_owner(i))
            return {o: ft.finetune_connector(m, o) for o in learned}
        return {o: self.at(self.finetune_owner(k)).finetune_connector(o)
                for k, o in enumerate(learned, 1)}

    def evaluate(self, i: int) -> Step:
        """theta_i with the connectors the method ends stage i with."""
        m = self.order[i - 1]
        tag = self.tag(self.method.realign) if self.realigns(i) else ""
        out = self.at(self.llm_owner(i))
        return Step(out.step_name(m, "evaluate", tag), "evaluate", m,
                    EvalSpec(self.llm(i), self.connectors(i), out.eval_metrics(m, tag)))


def _training(job: JobSpec) -> Step:
    return Step(job.name, job.phase, job.modality, job)


def merge_config(cfg: RunConfig, spec: MergeSpec):
    """The merge settings of a merge step: the config's, with the step's strategy, lam and
    coefficients."""
    update = {k: v for k, v in (("strategy", spec.strategy), ("lam", spec.lam),
                                ("coefficients", spec.coefficients)) if v is not None}
    return cfg.stages.merge.model_copy(update=update)


def find_step(steps: list[Step], phase: str, modality: str) -> Step:
    """The step of `phase` at `modality`'s stage (what `mera stage` runs)."""
    for step in steps:
        if step.phase == phase and step.modality == modality:
            return step
    why = {"merge": "the first stage has no merge",
           "align": "stages.align.enabled is false",
           "fisher": "only the ewc method of `mera bench mcl` estimates one",
           "base": "only the first stage of a run whose merges span the stages has one (stages."
                   "merge.across_stages)",
           "realign": "nothing is merged at the first stage, so it has no realign"
           if steps and modality == steps[0].modality else "stages.realign.enabled is false"
           }.get(phase, "stages.realign.enabled is false")
    raise MeraError(f"the run's plan has no {phase} step for modality {modality!r} ({why})")
