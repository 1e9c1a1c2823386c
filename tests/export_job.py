"""Run by tests/test_export.py in a fresh process: create a ZeRO-3-partitioned LLM, export it, and
report rank 0's memory high-water mark during the export against the model's size."""
import json
import os
import sys

import torch


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def main():
    out, bucket = sys.argv[1], int(sys.argv[2])
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    from mera_ds.config import LLMConfig, parse_config
    from mera_ds.model.llm import build_llm
    from mera_ds.train.export import export_llm
    from mera_ds.train.runtime import init_distributed, shutdown_distributed

    cfg = parse_config({"run_dir": out, "modalities": [
        {"name": "image", "encoder": {"type": "clip_vision"}, "train_shards": "x",
         "eval_shards": "x"}], "cluster": {"num_workers": 1}})
    init_distributed(cfg)
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    keep = HfDeepSpeedConfig(ds)  # noqa: F841
    llm_cfg = LLMConfig(tiny={"hidden_size": 512, "num_hidden_layers": 8,
                              "intermediate_size": 2048, "num_attention_heads": 8,
                              "num_key_value_heads": 8, "vocab_size": 8000})
    llm, tok = build_llm(llm_cfg)
    unset_hf_deepspeed_config()
    model_bytes = sum(p.ds_numel * p.element_size() for p in llm.parameters())
    # A first export loads the code it runs (library pages count in RSS too); the second one,
    # measured, holds only what the export allocates.
    export_llm(llm, tok, os.path.join(out, "warm-up"), shard_size=50 * 2**20, bucket_bytes=bucket)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark (VmHWM) to the current RSS
    before = rss_kb("VmRSS")
    export_llm(llm, tok, os.path.join(out, "llm"), shard_size=50 * 2**20, bucket_bytes=bucket)
    peak = rss_kb("VmHWM")
    largest = max(p.ds_numel * p.element_size() for p in llm.parameters())
    print(json.dumps({"model_bytes": model_bytes, "largest_param_bytes": largest,
                      "extra_bytes": (peak - before) * 1024}))
    shutdown_distributed()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
