"""One of two processes of `test_sharding.py`'s multi-host test, 4 CPU devices each.

    MIXTRAL_COORDINATOR_ADDRESS=localhost:PORT MIXTRAL_NUM_PROCESSES=2 \\
    MIXTRAL_PROCESS_ID=0|1 python -m tests.process_worker CHECKPOINT_DIR

Process 0 prints one JSON line: the sharded results against this process's
single-device results.
"""

from __future__ import annotations

import json
import os
import sys

from tests import xla_flags  # noqa: E402

if __name__ == "__main__":  # before JAX starts; a module that imports this keeps its devices
    os.environ["XLA_FLAGS"] = xla_flags(4)
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from mixtral_jax import Mixtral  # noqa: E402
from mixtral_jax.checkpoints.load import load  # noqa: E402
from mixtral_jax.checkpoints.store import save  # noqa: E402
from mixtral_jax.parallel import distributed  # noqa: E402
from mixtral_jax.parallel.mesh import MeshConfig  # noqa: E402
from mixtral_jax.params import flat_params  # noqa: E402
from mixtral_jax.training import steps  # noqa: E402
from tests.mesh_worker import batch, tiny_config  # noqa: E402


def main(directory: str) -> dict | None:
    assert distributed.initialize()
    assert jax.process_count() == 2 and len(jax.devices()) == 8
    # Two "slices" (one per process) doing data parallelism over DCN; inside each,
    # fsdp=2 x expert=2.
    mesh = MeshConfig(fsdp=2, expert=2, dcn_data=2).make_mesh()
    config = tiny_config()
    data = batch()

    reference = Mixtral(config, rngs=nnx.Rngs(0))  # on this process's first device
    ref_logits = np.asarray(reference(data["tokens"]))

    model = Mixtral(config, rngs=nnx.Rngs(0))
    forward = steps.jit_forward(model, mesh)
    rows = distributed.host_rows(forward.batch_sharding, len(data["tokens"]))
    tokens = distributed.global_batch(np.asarray(data["tokens"])[rows], forward.batch_sharding)
    logits = multihost_utils.process_allgather(forward(forward.params, tokens), tiled=True)

    sharded = flat_params(forward.params)
    save(directory, sharded, config)
    restored = load(directory, mesh=mesh)
    same_params = all(
        np.array_equal(
            multihost_utils.process_allgather(v, tiled=True),
            multihost_utils.process_allgather(sharded[p], tiled=True),
        )
        for p, v in flat_params(restored).items()
    )
    again = steps.jit_forward(restored, mesh)
    logits_again = multihost_utils.process_allgather(again(again.params, tokens), tiled=True)
    if jax.process_index() != 0:
        return None
    return {
        "rows": [rows.start, rows.stop],
        "logits": float(np.abs(logits - ref_logits).max()),
        "restored_logits": float(np.abs(logits_again - ref_logits).max()),
        "same_params": same_params,
        "w1_spec": str(
            tuple(flat_params(restored)[("layers", "moe", "experts", "w1")].sharding.spec)
        ),
    }


if __name__ == "__main__":
    result = main(sys.argv[1])
    if result is not None:
        print(json.dumps(result))
