"""The merge's worker threads: the output files are the same, byte for byte, whatever their
number; pieces written out of order land where the plan puts them; a failure stops them all."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from mera_ds.config import MergeConfig
from mera_ds.errors import MeraError
from mera_ds.io.format import TensorSpec
from mera_ds.io.writer import ShardPieceWriter, plan_shards
from mera_ds.merge.engine import BLOCK, READ, _work_order, merge_llm

from .test_merge import state


def checkpoint(path, seed):
    """Tensors of several pieces (READ elements each) and of less than a block, in bf16 and
    fp32, an integer buffer, in two files."""
    g = torch.Generator().manual_seed(seed)
    os.makedirs(path)
    files = [{"a.w": torch.randn(2 * READ + 3 * BLOCK + 5, generator=g).to(torch.bfloat16),
              "a.b": torch.randn(7, generator=g)},
             {"b.w": torch.randn(READ + 1, generator=g),
              "b.ids": torch.arange(11, dtype=torch.int64) + seed}]
    weight_map = {}
    for k, tensors in enumerate(files):
        name = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({t: name for t in tensors})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llms")
    return [checkpoint(root / f"m{k}", k) for k in range(3)]


def files(path) -> dict[str, bytes]:
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))}


@pytest.mark.parametrize("cfg", [
    MergeConfig(strategy="linear", shard_size="3MB"),
    MergeConfig(strategy="dare", drop_p=0.5, seed=1, shard_size="3MB"),
    MergeConfig(strategy="ties", density=0.3, shard_size="3MB"),
], ids=lambda c: c.strategy)
def test_one_and_several_threads_write_the_same_bytes(inputs, tmp_path, cfg):
    outs = []
    for threads in (1, 2, 3):
        out = tmp_path / f"t{threads}"
        merge_llm(inputs[0], inputs[1:], str(out), cfg.model_copy(update={"threads": threads}))
        outs.append(files(out))
    assert outs[0] == outs[1] == outs[2]
    assert sum(f.endswith(".safetensors") for f in outs[0]) > 1
    assert torch.equal(state(tmp_path / "t2")["b.ids"], torch.arange(11))  # prev's, untouched


def test_workers_take_the_shards_in_turn_each_in_file_order():
    """Two workers then write two files at once (buffered writes to one file wait for each
    other), and a remote shard, written as one stream, gets its pieces in order."""
    specs = [TensorSpec(f"t{k}", "BF16", (n * READ,)) for k, n in enumerate((3, 4, 2, 1))]
    shards = plan_shards(specs, 7 * READ * 2)  # 3 + 4 pieces, then 2 + 1
    assert [len(s.tensors) for s in shards] == [2, 2]
    order = _work_order(shards, elementwise=True)
    assert len(order) == 10
    for shard in shards:
        mine = [(spec.name, start) for s, spec, start, _ in order if s is shard]
        assert mine == sorted(mine, key=lambda p: (int(p[0][1:]), p[1]))  # file order
    # the shard furthest behind (the fraction of its pieces taken) always comes next
    done = {s.filename: 0 for s in shards}
    total = {s.filename: sum(-(-t.numel // READ) for t in s.tensors) for s in shards}
    for shard, *_ in order:
        assert shard.filename == min(done, key=lambda f: (done[f] / total[f], f))
        done[shard.filename] += 1


def test_pieces_written_in_any_order_land_in_place(tmp_path):
    x, y = torch.arange(10, dtype=torch.float32), torch.arange(6, dtype=torch.int32)
    (plan,) = plan_shards([TensorSpec.of("x", x), TensorSpec.of("y", y)], 1 << 20)
    writer = ShardPieceWriter(str(tmp_path), plan)
    assert not writer.write("y", 3, y[3:])
    assert not writer.write("x", 4, x[4:])
    assert not writer.write("x", 0, x[:4])
    assert writer.write("y", 0, y[:3])
    writer.close()
    got = state(tmp_path)
    assert torch.equal(got["x"], x) and torch.equal(got["y"], y)


def test_a_shard_closed_with_pieces_missing_says_so(tmp_path):
    x = torch.arange(10, dtype=torch.float32)
    (plan,) = plan_shards([TensorSpec.of("x", x)], 1 << 20)
    writer = ShardPieceWriter(str(tmp_path), plan)
    writer.write("x", 0, x[:6])
    with pytest.raises(MeraError, match="closed with 16 planned bytes not written"):
        writer.close()


def test_a_failing_worker_stops_the_merge(inputs, tmp_path):
    broken = tmp_path / "broken"
    os.makedirs(broken)
    for name, data in files(inputs[1]).items():
        # the last file cut short: the failure comes after the first file's pieces
        (broken / name).write_bytes(data[:-100] if name.startswith("model-00002") else data)
    with pytest.raises(MeraError, match="truncated"):
        merge_llm(inputs[0], [str(broken)], str(tmp_path / "out"),
                  MergeConfig(strategy="linear", threads=2))
    assert not [p for p in os.listdir(tmp_path) if p != "broken"]


def test_threads_must_be_positive():
    with pytest.raises(ValueError, match="threads"):
        MergeConfig(threads=0)


def test_two_threads_merge_into_s3_as_into_a_local_directory(inputs, s3_bucket, tmp_path):
    """An S3 shard is one stream written in order: the workers, taking the shards in turn,
    still hand each shard its pieces in file order, and nothing waits forever."""
    from mera_ds import storage

    cfg = MergeConfig(strategy="linear", shard_size="3MB", threads=2)
    merge_llm(inputs[0], inputs[1:], str(tmp_path / "local"), cfg)
    merge_llm(inputs[0], inputs[1:], f"{s3_bucket}/merged", cfg)
    local = files(tmp_path / "local")
    assert sum(f.endswith(".safetensors") for f in local) > 1
    for name, data in local.items():
        with storage.open_url(f"{s3_bucket}/merged/{name}", "rb") as f:
            assert f.read() == data, name
