"""The merge: every strategy against its formula computed here, the HF-layout reader and
writer, input checks, commit by rename, the CLI, and the peak memory of a large merge."""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from mera_ds.io.format import INDEX_FILE, TensorSpec
from mera_ds.io.reader import Checkpoint, read_header
from mera_ds.io.writer import ShardedWriter, plan_shards
from mera_ds.config import MergeConfig
from mera_ds.errors import MeraError
from mera_ds.merge.engine import BLOCK, CHUNK, READ, merge_llm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_llama(path, seed, dtype=torch.float32, tie=False, shard="40KB", tokenizer=False):
    """A tiny Llama in HF layout, saved by transformers in several safetensors shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                      tie_word_embeddings=tie)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(path, max_shard_size=shard)
    if tokenizer:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    return str(path)


def state(path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory, read by safetensors itself (not by our reader)."""
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("llms")
    return [tiny_llama(root / f"m{k}", seed=k, tokenizer=k == 0) for k in range(3)]


def f32(path):
    return {k: v.float() for k, v in state(path).items()}


# --- strategies against their formulas ------------------------------------------------------------

def test_mera_is_the_running_average_exactly(models, tmp_path):
    prev, ft = f32(models[0]), f32(models[1])
    out = tmp_path / "out"
    report = merge_llm(models[0], [models[1]], str(out), MergeConfig(strategy="mera"), step=3)
    merged = state(out)
    assert set(merged) == set(prev) and report.tensors == len(prev)
    for name, p in prev.items():
        assert torch.equal(merged[name], p + (ft[name] - p) / 3), name


def test_linear_is_the_normalised_weighted_average(models, tmp_path):
    out = tmp_path / "out"
    merge_llm(models[0], models[1:], str(out), MergeConfig(strategy="linear", weights=[1, 2, 5]))
    xs = [f32(m) for m in models]
    for name, got in state(out).items():
        want = (1 * xs[0][name] + 2 * xs[1][name] + 5 * xs[2][name]) / 8
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_task_arithmetic(models, tmp_path):
    out = tmp_path / "out"
    merge_llm(models[0], models[1:], str(out), MergeConfig(strategy="task_arithmetic", lam=0.7))
    base, a, b = (f32(m) for m in models)
    for name, got in state(out).items():
        want = base[name] + 0.7 * ((a[name] - base[name]) + (b[name] - base[name]))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def ties_reference(base, fts, density, lam):
    """TIES-merging (Yadav et al. 2023), written independently of mera_ds: trim by sorting,
    elect by the sign of the sum, disjoint mean."""
    trimmed = []
    for ft in fts:
        d = (ft - base).flatten()
        k = max(1, int(density * d.numel()))
        kth = d.abs().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(d.abs() >= kth, d, torch.zeros_like(d)))
    t = torch.stack(trimmed)
    elected = torch.sign(t.sum(0))
    agree = (torch.sign(t) == elected) & (t != 0)
    mean = (t * agree).sum(0) / agree.sum(0).clamp(min=1)
    return base + lam * mean.reshape(base.shape)


def test_ties(models, tmp_path):
    out = tmp_path / "out"
    merge_llm(models[0], models[1:], str(out),
              MergeConfig(strategy="ties", density=0.3, lam=1.2))
    base, a, b = (f32(m) for m in models)
    for name, got in state(out).items():
        torch.testing.assert_close(got, ties_reference(base[name], [a[name], b[name]], 0.3, 1.2),
                                   rtol=1e-5, atol=1e-6)
    # trimming keeps the top 30% of each delta: most elements are untouched by the merge
    emb = "model.embed_tokens.weight"
    assert (state(out)[emb] == base[emb]).float().mean() > 0.4


def test_dare_drops_and_rescales_reproducibly(models, tmp_path):
    cfg = MergeConfig(strategy="dare", drop_p=0.6, lam=1.0, seed=7)
    merge_llm(models[0], [models[1]], str(tmp_path / "a"), cfg)
    merge_llm(models[0], [models[1]], str(tmp_path / "b"), cfg.model_copy(
        update={"shard_size": "10KB"}))
    merge_llm(models[0], [models[1]], str(tmp_path / "c"), cfg.model_copy(update={"seed": 8}))
    base, ft = f32(models[0]), f32(models[1])
    a, b, c = state(tmp_path / "a"), state(tmp_path / "b"), state(tmp_path / "c")
    kept = total = 0
    for name, got in a.items():
        dropped = got == base[name]
        rescaled = torch.isclose(got, base[name] + (ft[name] - base[name]) / 0.4, rtol=1e-5,
                                 atol=1e-6)
        assert (dropped | rescaled).all(), name  # each element: dropped, or kept and rescaled
        kept, total = kept + (rescaled & ~dropped).sum().item(), total + got.numel()
        assert torch.equal(got, b[name])  # independent of the shard plan
    assert abs(kept / total - 0.4) < 0.02
    assert any(not torch.equal(a[n], c[n]) for n in a)  # the seed matters


def test_dare_draws_one_mask_per_block_of_a_large_tensor(tmp_path):
    """Block j of tensor w keeps the elements where rand(generator seeded by (seed, w, k, j))
    >= p: the same masks however many blocks the engine merges at once, in any version."""
    import hashlib

    n = READ + CHUNK + 2 * BLOCK + 5  # several reads and chunks, a short last block
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, generator=g), torch.randn(n, generator=g)
    for d, t in (("x", x), ("y", y)):
        os.makedirs(tmp_path / d)
        save_file({"w": t}, str(tmp_path / d / "model.safetensors"))
    merge_llm(str(tmp_path / "x"), [str(tmp_path / "y")], str(tmp_path / "out"),
              MergeConfig(strategy="dare", drop_p=0.3, lam=0.5, seed=5))
    masks = []
    for j, block in enumerate((y - x).split(BLOCK)):
        key = hashlib.sha256(f"5\0w\0{0}\0{j}".encode()).digest()[:8]
        rng = torch.Generator().manual_seed(int.from_bytes(key, "little") & (2**63 - 1))
        masks.append(torch.rand(block.shape, generator=rng) >= 0.3)
    want = ((y - x) * torch.cat(masks) / 0.7) * 0.5 + x
    assert torch.equal(state(tmp_path / "out")["w"], want)


def test_bf16_is_computed_in_fp32_and_stored_in_bf16(tmp_path):
    prev = tiny_llama(tmp_path / "p", 0, dtype=torch.bfloat16)
    ft = tiny_llama(tmp_path / "f", 1, dtype=torch.bfloat16)
    merge_llm(prev, [ft], str(tmp_path / "out"), MergeConfig(strategy="mera"), step=3)
    p, f = state(prev), state(ft)
    for name, got in state(tmp_path / "out").items():
        assert got.dtype == torch.bfloat16
        want = (p[name].float() + (f[name].float() - p[name].float()) / 3).to(torch.bfloat16)
        assert torch.equal(got, want), name


def test_large_tensors_span_several_reads_and_blocks(tmp_path):
    """A tensor of more than READ elements (and not a multiple of BLOCK) is merged piecewise."""
    n = READ + 3 * BLOCK + 5
    g = torch.Generator().manual_seed(0)
    x = {"w": torch.randn(n, generator=g).to(torch.bfloat16), "b": torch.randn(7, generator=g)}
    y = {"w": torch.randn(n, generator=g).to(torch.bfloat16), "b": torch.randn(7, generator=g)}
    for d, t in (("x", x), ("y", y)):
        os.makedirs(tmp_path / d)
        save_file(t, str(tmp_path / d / "model.safetensors"), metadata={"format": "pt"})
    merge_llm(str(tmp_path / "x"), [str(tmp_path / "y")], str(tmp_path / "out"),
              MergeConfig(strategy="mera"), step=4)
    got = state(tmp_path / "out")
    for name in x:
        want = (x[name].float() + (y[name].float() - x[name].float()) / 4).to(x[name].dtype)
        assert torch.equal(got[name], want)


# --- the output directory -------------------------------------------------------------------------

def test_output_is_a_loadable_hf_directory(models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    report = merge_llm(models[0], [models[1]], str(out),
                       MergeConfig(strategy="mera", shard_size="30KB"), step=2)
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(shards) == report.shards > 2
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.load(open(out / INDEX_FILE))
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in state(out).values())
    assert index["metadata"]["merge"]["strategy"] == "mera"
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert open(out / name, "rb").read() == open(os.path.join(models[0], name), "rb").read()
    model = AutoModelForCausalLM.from_pretrained(str(out))
    merged = state(out)
    for name, p in model.state_dict().items():
        assert torch.equal(p, merged[name]), name
    assert AutoTokenizer.from_pretrained(str(out))("hello")["input_ids"] == [1]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary left


def test_tied_embeddings_merge_and_load(tmp_path):
    from transformers import AutoModelForCausalLM

    prev = tiny_llama(tmp_path / "p", 0, tie=True)
    ft = tiny_llama(tmp_path / "f", 1, tie=True)
    assert "lm_head.weight" not in state(prev)  # saved once, as the embeddings
    merge_llm(prev, [ft], str(tmp_path / "out"), MergeConfig(strategy="mera"), step=2)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    emb = "model.embed_tokens.weight"
    want = state(prev)[emb] + (state(ft)[emb] - state(prev)[emb]) / 2
    assert torch.equal(model.lm_head.weight, want)


def test_sharded_writer_without_a_plan_flushes_by_size(tmp_path):
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(10)}  # 400 B each
    with ShardedWriter(str(tmp_path / "w"), max_shard_size=1000) as w:
        for name, t in tensors.items():
            w.add(name, t)
    files = sorted(f for f in os.listdir(tmp_path / "w") if f.endswith(".safetensors"))
    assert files == [f"model-{k:05d}-of-00005.safetensors" for k in range(1, 6)]
    got = state(tmp_path / "w")
    assert all(torch.equal(got[n], t) for n, t in tensors.items())
    ckpt = Checkpoint(str(tmp_path / "w"))
    assert ckpt.names == list(tensors) and torch.equal(ckpt.read("t3", 10, 5), tensors["t3"][:5])


def test_sharded_writer_with_a_plan_streams_in_order(tmp_path):
    tensors = {"a": torch.ones(2, 3, dtype=torch.bfloat16), "b": torch.arange(5),
               "c": torch.zeros(4)}
    plan = [TensorSpec.of(n, t) for n, t in tensors.items()]
    assert [len(s.tensors) for s in plan_shards(plan, 20)] == [1, 1, 1]
    with ShardedWriter(str(tmp_path / "w"), max_shard_size=100, plan=plan) as w:
        for n, t in tensors.items():
            w.add(n, t)
    assert all(torch.equal(state(tmp_path / "w")[n], t) for n, t in tensors.items())
    w = ShardedWriter(str(tmp_path / "x"), max_shard_size=100, plan=plan)
    with pytest.raises(MeraError, match="got tensor b, the plan expects a"):
        w.add("b", tensors["b"])
    w = ShardedWriter(str(tmp_path / "y"), max_shard_size=100, plan=plan)
    w.add("a", tensors["a"])
    with pytest.raises(MeraError, match=r"closed before all planned tensors .*next: b"):
        w.close()
    assert not os.path.exists(tmp_path / "y" / INDEX_FILE)


# --- bad inputs ----------------------------------------------------------------------------------

def write_dir(path, tensors, config=None):
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        json.dump(config, open(os.path.join(path, "config.json"), "w"))
    return str(path)


BASE = {"model.embed_tokens.weight": torch.zeros(4, 2), "lm_head.weight": torch.ones(4, 2),
        "model.norm.weight": torch.ones(2)}


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("model.norm.weight"),
     r"f: has no tensor model\.norm\.weight, which .*p/model\.safetensors has$"),
    (lambda t: t.update(extra=torch.ones(1)),
     r"f/model\.safetensors: has tensor extra, which .*p lacks$"),
    (lambda t: t.update({"model.norm.weight": torch.ones(3)}),
     r"f/model\.safetensors: tensor model\.norm\.weight has shape \[3\] but \[2\] in .*p/"),
    (lambda t: t.update({"model.norm.weight": torch.ones(2, dtype=torch.float16)}),
     r"f/model\.safetensors: tensor model\.norm\.weight is F16 but F32 in .*p/model"),
    (lambda t: t.pop("lm_head.weight"),
     r"has no tensor lm_head\.weight, .* \(tied embeddings on one side only\?\)$"),
])
def test_mismatched_inputs_are_one_line_errors(tmp_path, change, message):
    prev = write_dir(tmp_path / "p", dict(BASE))
    ft_tensors = dict(BASE)
    change(ft_tensors)
    ft = write_dir(tmp_path / "f", ft_tensors)
    with pytest.raises(MeraError, match=message) as e:
        merge_llm(prev, [ft], str(tmp_path / "out"), MergeConfig(strategy="mera"), step=2)
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "out")


def test_tied_and_untied_llms_are_not_merged(tmp_path):
    prev = write_dir(tmp_path / "p", dict(BASE), {"tie_word_embeddings": False})
    ft = write_dir(tmp_path / "f", dict(BASE), {"tie_word_embeddings": True})
    with pytest.raises(MeraError, match=r"f/config\.json: tie_word_embeddings is True but "
                                        r"False in .*p/config\.json"):
        merge_llm(prev, [ft], str(tmp_path / "out"), MergeConfig(strategy="mera"), step=2)


def test_integer_tensors_are_copied_from_prev(tmp_path):
    prev = write_dir(tmp_path / "p", {"w": torch.zeros(3), "ids": torch.arange(4)})
    ft = write_dir(tmp_path / "f", {"w": torch.ones(3), "ids": torch.arange(4) * 7})
    merge_llm(prev, [ft], str(tmp_path / "out"), MergeConfig(strategy="linear"))
    got = state(tmp_path / "out")
    assert torch.equal(got["ids"], torch.arange(4)) and torch.equal(got["w"], torch.full((3,), .5))


@pytest.mark.parametrize("cfg, step, n_ft, message", [
    (MergeConfig(strategy="mera"), 1, 1, "step must be >= 2"),
    (MergeConfig(strategy="mera"), 3, 2, "or i of them .*got 2 at step 3"),
    (MergeConfig(strategy="linear", weights=[1, 2, 3]), None, 1, "3 weights for 2 models"),
    (MergeConfig(strategy="linear", weights=[1, -1]), None, 1, "the weights sum to 0"),
])
def test_bad_strategy_arguments(tmp_path, cfg, step, n_ft, message):
    prev = write_dir(tmp_path / "p", dict(BASE))
    with pytest.raises(MeraError, match=message):
        merge_llm(prev, [prev] * n_ft, str(tmp_path / "out"), cfg, step=step)


def test_bad_checkpoints_name_the_file(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(MeraError, match=r"empty: not an HF safetensors directory"):
        Checkpoint(str(tmp_path / "empty"))
    write_dir(tmp_path / "junk", dict(BASE))
    with open(tmp_path / "junk" / "model.safetensors", "wb") as f:
        f.write(b"\xff" * 64)
    with pytest.raises(MeraError, match=r"junk/model\.safetensors: not a safetensors file"):
        Checkpoint(str(tmp_path / "junk"))


# --- committed by rename ------------------------------------------------------------------------

def test_a_failed_merge_leaves_no_directory(models, tmp_path):
    """The fine-tuned LLM's last shard is truncated: the merge fails after writing earlier shards;
    neither the output nor its temporary directory is left."""
    ft = shutil.copytree(models[1], tmp_path / "ft")
    last = sorted(f for f in os.listdir(ft) if f.endswith(".safetensors"))[-1]
    with open(ft / last, "r+b") as f:
        f.truncate(os.path.getsize(ft / last) - 16)
    out = tmp_path / "out" / "llm"
    with pytest.raises(MeraError, match=rf"{last}: truncated: tensor .* needs bytes"):
        merge_llm(models[0], [str(ft)], str(out), MergeConfig(strategy="mera", shard_size="20KB"),
                  step=2)
    assert os.listdir(tmp_path / "out") == []


def test_an_existing_output_is_kept(models, tmp_path):
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "keep").write_text("x")
    with pytest.raises(MeraError, match="already exists"):
        merge_llm(models[0], [models[1]], str(out), MergeConfig(strategy="mera"), step=2)
    assert os.listdir(out) == ["keep"]
    merge_llm(models[0], [models[1]], str(out), MergeConfig(strategy="mera"), step=2,
              overwrite=True)
    assert os.path.exists(out / INDEX_FILE) and not os.path.exists(out / "keep")


def big_checkpoint(path, n_tensors, rows, cols, seed):
    """An fp32 checkpoint written shard by shard (one tensor in memory at a time)."""
    os.makedirs(path)
    g = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i in range(n_tensors):
        name, fname = f"model.layers.{i}.w", f"model-{i + 1:05d}-of-{n_tensors:05d}.safetensors"
        save_file({name: torch.randn(rows, cols, generator=g)}, os.path.join(path, fname),
                  metadata={"format": "pt"})
        weight_map[name] = fname
    json.dump({"weight_map": weight_map}, open(os.path.join(path, INDEX_FILE), "w"))
    return str(path)


def test_a_killed_merge_leaves_nothing_that_looks_complete(tmp_path):
    prev = big_checkpoint(tmp_path / "p", 24, 1024, 1024, 0)
    ft = big_checkpoint(tmp_path / "f", 24, 1024, 1024, 1)
    out = tmp_path / "out"
    code = (f"import sys; sys.path.insert(0, {REPO!r})\n"
            "from mera_ds.config import MergeConfig\nfrom mera_ds.merge.engine import merge_llm\n"
            f"merge_llm({prev!r}, [{ft!r}], {str(out)!r}, MergeConfig(strategy='mera', "
            "shard_size='4MB'), step=2)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait for the first shard in the temporary directory
        tmps = [d for d in os.listdir(tmp_path) if d.startswith(".out.tmp-")]
        if tmps and any(f.endswith(".safetensors") for f in os.listdir(tmp_path / tmps[0])):
            break
        assert proc.poll() is None, "the merge ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(out)
    (tmp,) = [d for d in os.listdir(tmp_path) if d.startswith(".out.tmp-")]
    assert not os.path.exists(tmp_path / tmp / INDEX_FILE)


# --- bounded memory ------------------------------------------------------------------------------

def test_peak_memory_is_bounded_whatever_the_model_and_shard_size(tmp_path):
    """Merging two 512 MB checkpoints (32 MB tensors) into a single 1 GB-bounded output shard
    raises the peak RSS of a fresh process by far less than a model or a shard: about the read
    and output buffers, 2 x (K + 2) x READ x 4 B = 64 MB for K = 2 fp32 inputs.

    The peak is the kernel's high-water mark of the process's own memory (VmHWM), reset to the
    current RSS just before the merge; ru_maxrss would not do: a child inherits its parent's."""
    prev = big_checkpoint(tmp_path / "p", 16, 4096, 2048, 0)
    ft = big_checkpoint(tmp_path / "f", 16, 4096, 2048, 1)
    model_bytes = 16 * 4096 * 2048 * 4
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {REPO!r})
        from mera_ds.config import MergeConfig
        from mera_ds.merge.engine import merge_llm
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before, hwm = status("VmRSS"), status("VmHWM")
        merge_llm({prev!r}, [{ft!r}], {str(tmp_path / 'out')!r},
                  MergeConfig(strategy="mera", shard_size="1GB"), step=2)
        print(status("VmHWM") - max(before, hwm))
    """)
    grown = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                               text=True).stdout.split()[-1])
    bound = 2 * (2 + 2) * READ * 4 + 32 * 2**20  # buffers + slack for threads and allocator
    assert 0 < grown < bound < model_bytes / 4, f"peak grew by {grown / 2**20:.0f} MiB"
    assert len([f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors")]) == 1


# --- the CLI ------------------------------------------------------------------------------------

def run_cli(argv):
    from mera_ds.cli import merge as merge_cli

    parser = argparse.ArgumentParser(prog="mera")
    merge_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_merges(models, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(["merge", "--strategy", "linear", "--prev", models[0], "--finetuned",
                    models[1], "--finetuned", models[2], "--weights", "1", "1", "2",
                    "--shard-size", "50KB", "--out", str(out)]) == 0
    assert "merged 21 tensors" in capsys.readouterr().out
    xs = [f32(m) for m in models]
    for name, got in state(out).items():
        torch.testing.assert_close(got, (xs[0][name] + xs[1][name] + 2 * xs[2][name]) / 4)


@pytest.mark.parametrize("extra, message", [
    (["--strategy", "ties", "--density", "2"], "--density: Input should be less than or equal"),
    (["--shard-size", "big"], "--shard-size: 'big' is not a size"),
    (["--workers", "0"], "--workers: must be at least 1"),
])
def test_cli_bad_options(models, tmp_path, extra, message):
    with pytest.raises(MeraError, match=message):
        run_cli(["merge", "--prev", models[0], "--finetuned", models[1], "--step", "2",
                 "--out", str(tmp_path / "out"), *extra])


def test_read_header_orders_tensors_by_offset(models):
    index = json.load(open(os.path.join(models[0], INDEX_FILE)))["weight_map"]
    file = os.path.join(models[0], sorted(set(index.values()))[0])
    infos, meta = read_header(file)
    assert meta.get("format") == "pt"
    assert [i.offset for i in infos] == sorted(i.offset for i in infos)
    got = load_file(file)
    ckpt = Checkpoint(models[0])
    assert all(torch.equal(ckpt.get(i.name), got[i.name]) for i in infos)
