"""Loader: batches are pure functions of (seed, step), epochs are permutations, masks are right."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from flax_gpt.config import DataConfig
from flax_gpt.data.loader import EvalLoader, TrainLoader, make_batch
from flax_gpt.data.prepare import prepare_shards
from flax_gpt.data.shards import open_split
from flax_gpt.errors import DataError

EOS = 50256


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    cfg = DataConfig(source="synthetic", synthetic_docs=120, seq_len=32, rows_per_shard=100,
                     val_fraction=0.1, shards_dir=str(tmp_path_factory.mktemp("loader") / "s"))
    prepare_shards(cfg, log=lambda *_: None)
    return cfg.shards_dir


@pytest.fixture(scope="module")
def train_rows(shards_dir):
    return open_split(shards_dir, "train")


def row_lookup(rows) -> dict[bytes, int]:
    all_rows = rows.rows(np.arange(rows.num_rows))
    table = {r.tobytes(): i for i, r in enumerate(all_rows)}
    assert len(table) == rows.num_rows  # rows are distinct, so content identifies a row
    return table


def loader(rows, **kw):
    args = dict(global_batch=48, seed=7, document_mask=False, packing="pack", prefetch=0)
    args.update(kw)
    return TrainLoader(rows, **args)


def test_same_seed_and_step_give_the_same_batch_after_recreation(shards_dir, train_rows):
    a = loader(train_rows)
    b = loader(open_split(shards_dir, "train"), document_mask=False)
    for step in (0, 3, 17, 250):
        ba, bb = a.local_batch(step), b.local_batch(step)
        for k in ba:
            np.testing.assert_array_equal(ba[k], bb[k])
    other_seed = loader(train_rows, seed=8).local_batch(0)["inputs"]
    assert not np.array_equal(other_seed, a.local_batch(0)["inputs"])
    assert not np.array_equal(a.local_batch(1)["inputs"], a.local_batch(0)["inputs"])


def test_every_row_once_per_epoch(train_rows):
    lookup = row_lookup(train_rows)
    n, b = train_rows.num_rows, 48
    assert n % b  # batches straddle epochs
    ld = loader(train_rows, global_batch=b)
    steps = 2 * n // b + 2
    seen = []
    for step in range(steps):
        seen += [lookup[r.tobytes()] for r in ld.local_batch(step)["inputs"]]
    epoch0, epoch1 = seen[:n], seen[n:2 * n]
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1  # a fresh permutation each epoch
    epoch2 = seen[2 * n:]
    assert epoch2 and len(set(epoch2)) == len(epoch2)  # the third epoch has begun, no repeats yet


def test_iterate_resumes_mid_stream_with_prefetch(train_rows):
    ld = loader(train_rows, prefetch=3)
    full = [(s, np.asarray(b["inputs"])) for s, b in ld.iterate(0, 8)]
    resumed = [(s, np.asarray(b["inputs"])) for s, b in loader(train_rows, prefetch=2).iterate(5, 8)]
    assert [s for s, _ in full] == list(range(8)) and [s for s, _ in resumed] == [5, 6, 7]
    for (s1, x1), (s2, x2) in zip(full[5:], resumed):
        assert s1 == s2
        np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(full[2][1], ld.local_batch(2)["inputs"])


def test_global_batch_matches_local_batch(train_rows):
    ld = loader(train_rows, document_mask=True)
    g, local = ld.global_batch(4), ld.local_batch(4)
    # The devices get what the step needs; positions/segment_ids are derived there from inputs.
    assert set(g) == {"inputs", "targets", "loss_mask"}
    assert set(local) == {"inputs", "targets", "loss_mask", "positions", "segment_ids"}
    for k in g:
        assert g[k].shape == (48, 32) and g[k].dtype == local[k].dtype
        np.testing.assert_array_equal(np.asarray(g[k]), local[k])


def naive_batch(row, packing, document_mask):
    T = len(row)
    targets = list(row[1:]) + [EOS]
    mask = [1.0] * (T - 1) + [0.0]
    if packing == "pad":
        seen = False
        for t in range(T):
            if row[t] == EOS:
                seen = True
            if seen:
                mask[t] = 0.0
    pos, seg = list(range(T)), [1] * T
    if document_mask:
        p, s = 0, 1
        for t in range(T):
            pos[t], seg[t] = p, s
            p += 1
            if row[t] == EOS:
                p, s = 0, s + 1
    return targets, mask, pos, seg


@pytest.mark.parametrize("packing", ["pack", "pad"])
@pytest.mark.parametrize("document_mask", [False, True])
def test_make_batch_matches_a_naive_loop(packing, document_mask):
    rows = np.array([
        [5, 6, EOS, 7, 8, 9, EOS, 10],
        [EOS, 1, 2, 3, EOS, EOS, EOS, EOS],
        [1, 2, 3, 4, 5, 6, 7, 8],
        [1, 2, EOS, EOS, EOS, EOS, EOS, EOS],
    ], dtype=np.int32)
    batch = make_batch(rows.copy(), eos_id=EOS, document_mask=document_mask, packing=packing)
    np.testing.assert_array_equal(batch["inputs"], rows)
    for i, row in enumerate(rows.tolist()):
        targets, mask, pos, seg = naive_batch(row, packing, document_mask)
        assert batch["targets"][i].tolist() == targets
        assert batch["loss_mask"][i].tolist() == mask
        assert batch["positions"][i].tolist() == pos
        assert batch["segment_ids"][i].tolist() == seg
    assert batch["loss_mask"].dtype == np.float32
    assert all(batch[k].dtype == np.int32 for k in ("inputs", "targets", "positions", "segment_ids"))
    if packing == "pad":  # the first EOS is a target; the padding after it is not
        assert batch["loss_mask"][3].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]


class FakeSharding:
    """Stands in for a NamedSharding on a process that holds devices with rows [2:4] and [6:8]."""

    def addressable_devices_indices_map(self, shape):
        assert shape == (8, 32)
        return {"dev0": (slice(6, 8), slice(None)), "dev1": (slice(2, 4), slice(None)),
                "dev2": (slice(2, 4), slice(None))}  # a replica: counted once


def test_local_batch_is_this_process_slice(train_rows):
    full = loader(train_rows, global_batch=8)
    part = loader(train_rows, global_batch=8, sharding=FakeSharding())
    assert part.local_rows.tolist() == [2, 3, 6, 7]
    for step in (0, 9):
        a, b = full.local_batch(step), part.local_batch(step)
        for k in a:
            np.testing.assert_array_equal(b[k], a[k][[2, 3, 6, 7]])


def test_eval_loader_covers_every_row_once(shards_dir):
    rows = open_split(shards_dir, "val")
    lookup = row_lookup(rows)
    batch = 7
    assert rows.num_rows % batch  # the last batch is partial
    ev = EvalLoader(rows, batch=batch, document_mask=True, packing="pack", prefetch=0)
    assert ev.num_batches == -(-rows.num_rows // batch)
    seen, masked_rows = [], 0
    for i, b in enumerate(ev):
        inputs, mask = (np.asarray(b[k]) for k in ("inputs", "loss_mask"))
        seg = ev.local_batch(i)["segment_ids"]
        assert inputs.shape == (batch, 32)
        for r, m, s in zip(inputs, mask, seg):
            if m.sum() == 0:
                masked_rows += 1
                assert (s == 0).all()
            else:
                seen.append(lookup[r.tobytes()])
                assert (s > 0).all()
    assert seen == list(range(rows.num_rows))  # in order, each exactly once
    assert masked_rows == ev.num_batches * batch - rows.num_rows > 0
    assert sum(mask.sum() for mask in [ev.local_batch(i)["loss_mask"] for i in range(ev.num_batches)]) == \
        rows.num_rows * 31


class ExplodingRows:
    def __init__(self, rows, bad_step_rows):
        self._rows, self.bad = rows, bad_step_rows
        for name in ("num_rows", "seq_len", "eos_id", "packing", "split", "shards_dir"):
            setattr(self, name, getattr(rows, name))

    def rows(self, idx, out=None):
        if self.bad.intersection(idx.tolist()):
            raise RuntimeError("disk on fire")
        return self._rows.rows(idx, out=out)


def test_prefetch_propagates_errors_and_shuts_down(train_rows):
    ld = loader(train_rows, global_batch=4, prefetch=2)
    poisoned = set(ld.row_indices(3).tolist())
    bad = loader(ExplodingRows(train_rows, poisoned), global_batch=4, prefetch=2)
    got = []
    with pytest.raises(RuntimeError, match="disk on fire"):
        for step, _ in bad.iterate(0, 10):
            got.append(step)
    assert got == [0, 1, 2]
    gen = ld.iterate(0, None)
    next(gen)
    gen.close()  # early exit: the producer thread must stop
    deadline = time.time() + 5
    while any(t.name == "flax_gpt-prefetch" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "flax_gpt-prefetch" for t in threading.enumerate())


def test_empty_train_split_is_a_clear_error(tmp_path):
    cfg = DataConfig(source="synthetic", synthetic_docs=2, seq_len=1024, val_fraction=0.0,
                     shards_dir=str(tmp_path / "s"))
    prepare_shards(cfg, log=lambda *_: None)
    with pytest.raises(DataError, match="has no rows.*lower data.seq_len"):
        TrainLoader(open_split(cfg.shards_dir, "train"), global_batch=2, seed=0, document_mask=False)


def test_reused_host_buffers_never_overwrite_a_held_batch(train_rows):
    ld = loader(train_rows, document_mask=True)
    fresh = loader(train_rows, document_mask=True)
    held_local = ld.local_batch(0)
    held_global = ld.global_batch(1)  # on CPU, jax may alias the host buffer instead of copying
    for step in range(2, 12):
        ld.local_batch(step)
        ld.global_batch(step)
    for key, value in fresh.local_batch(0).items():
        np.testing.assert_array_equal(held_local[key], value)
    for key in held_global:
        np.testing.assert_array_equal(np.asarray(held_global[key]), fresh.local_batch(1)[key])
    del held_local, held_global
    pool = len(ld._buffers)
    for step in range(12, 40):
        ld.local_batch(step)
    assert len(ld._buffers) == pool  # released sets are reused, the pool does not grow


def test_constant_arrays_are_cached_but_equal_to_fresh_ones(train_rows):
    ld = loader(train_rows)
    a, b = ld.global_batch(0), ld.global_batch(1)
    assert a["loss_mask"] is b["loss_mask"] and a["inputs"] is not b["inputs"]
    local = ld.local_batch(1)
    for key in b:
        np.testing.assert_array_equal(np.asarray(b[key]), local[key])
    a["loss_mask"].delete()  # as if a train step had donated it
    c = ld.global_batch(2)
    assert not c["loss_mask"].is_deleted()
    np.testing.assert_array_equal(np.asarray(c["loss_mask"]), ld.local_batch(2)["loss_mask"])
    masked = loader(train_rows, document_mask=True)
    d, e = masked.global_batch(0), masked.global_batch(1)
    assert d["loss_mask"] is e["loss_mask"] and d["inputs"] is not e["inputs"]
    for key in e:
        np.testing.assert_array_equal(np.asarray(e[key]), masked.local_batch(1)[key])



def test_pad_mode_batches_are_never_cached(tmp_path):
    cfg = DataConfig(source="synthetic", synthetic_docs=30, seq_len=300, packing="pad", val_fraction=0.0,
                     shards_dir=str(tmp_path / "pad"))
    prepare_shards(cfg, log=lambda *_: None)
    ld = loader(open_split(cfg.shards_dir, "train"), global_batch=4, packing="pad")
    f, g = ld.global_batch(0), ld.global_batch(1)
    for batch, step in ((f, 0), (g, 1)):
        np.testing.assert_array_equal(np.asarray(batch["loss_mask"]), ld.local_batch(step)["loss_mask"])
    # Documents end at different places, so the masks differ from step to step.
    assert not np.array_equal(np.asarray(f["loss_mask"]), np.asarray(g["loss_mask"]))


def test_packing_mismatch_and_indivisible_batch(train_rows):
    with pytest.raises(DataError, match="packing 'pack'.*--overwrite"):
        loader(train_rows, packing="pad")

    class Indivisible:
        def addressable_devices_indices_map(self, shape):
            raise ValueError("implies that array axis 0 is partitioned 4 times, but the dimension size is 6")

    with pytest.raises(DataError, match="multiple of the data-parallel device count"):
        loader(train_rows, global_batch=6, sharding=Indivisible())


def test_document_positions_on_device_equal_the_host_computation():
    """The train step derives positions/segment_ids on the devices: the same values as the
    host-side make_batch for every row, EOS at row starts, ends and runs included."""
    import jax

    from flax_gpt.train.step import document_positions

    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 100, (6, 40)).astype(np.int32)
    tokens[rng.random(tokens.shape) < 0.08] = 99
    tokens[0, 0] = tokens[1, -1] = 99
    tokens[2, 5:9] = 99
    host = make_batch(tokens.copy(), eos_id=99, document_mask=True, packing="pack")
    positions, segment_ids = jax.device_get(jax.jit(document_positions, static_argnums=1)(tokens, 99))
    np.testing.assert_array_equal(positions, host["positions"])
    np.testing.assert_array_equal(segment_ids, host["segment_ids"])
