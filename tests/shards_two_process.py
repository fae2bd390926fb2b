"""One of the processes of shards_test's two-process check (not a test module itself).

    python tests/shards_two_process.py ADDRESS PROCESS_ID SHARD_DIR OUT.npz

Joins a two-process jax.distributed run (two CPU devices each), reads its rows of the first
three global batches of SHARD_DIR through data.train_batches, puts each global batch together
with the trainer's _device_batch (jax.make_array_from_process_local_data) and gathers it back;
writes both the local rows and the gathered global batches to OUT.npz.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from tsld_jax import data as data_lib  # noqa: E402
from tsld_jax import multihost, sharding, trainer  # noqa: E402
from tsld_jax.models import named  # noqa: E402


def main(address: str, process_id: int, path: str, out: str) -> None:
    multihost.initialize(address, 2, process_id)
    cfg = ml_collections.ConfigDict(
        {"name": "shards", "path": path, "block_size": 8, "batch_size": 4, "workers": 1}
    )
    batches = data_lib.train_batches(cfg, 3, named.ByteTokenizer(), 256)
    mesh = sharding.make_mesh(-1, 1, 1)
    local, gathered = [], []
    for _ in range(3):
        batch = next(batches)
        local.append(batch["tokens"])
        arrays = trainer._device_batch(batch, sharding.batch_sharding(mesh), batches.process_local)
        gathered.append(multihost_utils.process_allgather(arrays["tokens"], tiled=True))
    np.savez(out, local=np.stack(local), gathered=np.stack(gathered))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
