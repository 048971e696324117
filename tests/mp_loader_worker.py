"""Worker for tests/test_data_multiprocess.py: one JAX process feeding a ("data",) mesh.

usage: mp_loader_worker.py SHARDS_DIR OUT.npz PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES

Writes, for a few train steps and every eval batch, each addressable shard of every batch array
with its global row offset, plus the process_allgather'ed global arrays. The test reassembles the
shards of all processes and compares them with a 1-process run.
"""

import os
import sys

shards_dir, out, pid, nproc, port, ndev = sys.argv[1:7]
pid, nproc, ndev = int(pid), int(nproc), int(ndev)
# Must be set before jax is imported.
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
if nproc > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                               process_id=pid, initialization_timeout=60)

from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from flax_gpt.data.loader import EvalLoader, TrainLoader  # noqa: E402
from flax_gpt.data.shards import open_split  # noqa: E402

assert jax.device_count() == 4, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("data",))
sharding = NamedSharding(mesh, P("data"))

result = {}


def record(tag, batch):
    for key, arr in batch.items():
        assert arr.shape == (GLOBAL_B, arr.shape[1]) and arr.sharding == sharding, (key, arr.shape)
        for shard in arr.addressable_shards:
            start = shard.index[0].start or 0
            result[f"{tag}/{key}/shard@{start}"] = np.asarray(shard.data)
        result[f"{tag}/{key}/gathered"] = np.asarray(multihost_utils.process_allgather(arr, tiled=True))


GLOBAL_B = 8
train = TrainLoader(open_split(shards_dir, "train"), global_batch=GLOBAL_B, seed=3, document_mask=True,
                    packing="pack", sharding=sharding, prefetch=2)
steps = [0, 1, 5, 13]
for step, batch in train.iterate(0, 14):
    if step in steps:
        record(f"train{step}", batch)
result["local_rows"] = train.local_rows

GLOBAL_B = 8
evals = EvalLoader(open_split(shards_dir, "val"), batch=GLOBAL_B, document_mask=False, packing="pack",
                   sharding=sharding)
for i, batch in enumerate(evals):
    record(f"eval{i}", batch)
result["eval_batches"] = np.array(evals.num_batches)

np.savez(out, **result)
if nproc > 1:
    multihost_utils.sync_global_devices("done")
print(f"process {pid}: ok", flush=True)
