"""Run under `torchrun` by tests/test_train.py: the plan's training step of a phase and modality
(of the run's plan, or of a benchmark method's), one job per rank, plus what a test needs to see
from inside it (each rank's partition, parameters before and after)."""
import json
import os
import sys
import time

import torch.distributed as dist
from safetensors.torch import save_file

from mera_ds.config import parse_config
from mera_ds.run.layout import RunLayout
from mera_ds.run.mcl import EVERY_METHOD
from mera_ds.run.plan import Method, find_step, plan
from mera_ds.train.export import gathered
from mera_ds.train.recipe import run_job
from mera_ds.train.runtime import shutdown_distributed


def main():
    cfg_path, phase, modality, out, *method = sys.argv[1:]
    sleep_rank = int(os.environ.get("TEST_SLEEP_RANK", "-1"))
    with open(cfg_path) as f:
        cfg = parse_config(json.load(f), cfg_path)
    # A benchmark method's step (its plan as `mera bench mcl` lays it), or the config's run's.
    steps = plan(cfg, EVERY_METHOD[method[0]], RunLayout.of(cfg), chained=True) if method else \
        plan(cfg, Method.of(cfg), RunLayout.of(cfg))
    spec = find_step(steps, phase, modality).spec

    def observe(event, engine):
        rank = dist.get_rank()
        if event == "start" and rank == sleep_rank:
            time.sleep(cfg.cluster.timeout_s + 20)  # a hung rank: the peer must time out
        module = engine.module
        if event == "start" and rank == 0:
            trainable = {n: p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                         for n, p in module.named_parameters() if p.requires_grad}
            with open(os.path.join(out, "trainable.json"), "w") as f:
                json.dump(trainable, f)
        # Each rank's own ZeRO-3 partition of every LLM parameter.
        part = {n: p.ds_tensor.detach().clone() for n, p in module.llm.named_parameters()
                if hasattr(p, "ds_tensor")}  # none when the LLM is replicated (realign)
        save_file(part, os.path.join(out, f"{event}-partition-rank{rank}.safetensors"))
        named = [(f"llm.{n}", [p], None) for n, p in module.llm.named_parameters()]
        named += [(f"connector.{m}.{n}", [p], None) for m, c in module.connectors.items()
                  for n, p in c.named_parameters()]
        full = dict(gathered(named, 1 << 20))
        if rank == 0:
            full.update({f"encoder.{m}.{n}": b.detach().clone()
                         for m, e in module.encoders.items() for n, b in e.state_dict().items()})
            save_file({k: v.contiguous() for k, v in full.items()},
                      os.path.join(out, f"{event}-full.safetensors"))

    metrics = run_job(cfg, spec, observe=observe)
    if dist.get_rank() == 0:
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(metrics, f)
    shutdown_distributed()


if __name__ == "__main__":
    main()
