"""Host-local placement helpers: prompt shares, spec restriction, the single-process gather.

The end-to-end host-local runs (equal to the global run, and hosts played in turn) are in
tests/test_sampling_engine.py, where they reuse the engine's compiled programs. The multi-process run
(several JAX processes, a real ``process_allgather``) belongs to the multi-host harness.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from sgalm_jax.sampling_placement import _local_spec, gather_host_rows, host_share
from sgalm_jax.sharding import make_mesh


def test_host_share_and_spec_restriction():
    shares = [host_share(10, p, 4) for p in range(4)]
    assert shares == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert host_share(2, 3, 4) == (2, 2)  # more hosts than prompts: an empty share
    assert host_share(5) == (0, 5)  # one process
    mesh = make_mesh({"data": 4, "tensor": 2}) if jax.device_count() >= 8 else None
    if mesh is not None:
        assert _local_spec(P("fsdp", "tensor"), (64, 128), mesh) == P(None, "tensor")
        assert _local_spec(P(("data", "tensor"),), (12,), mesh) == P(None)  # 8 does not split 12
        spec = P(None, ("data", "tensor"))
        assert _local_spec(spec, (3, 16), mesh) == spec
    rows = dict(tokens=np.arange(6).reshape(3, 2), lengths=np.array([1, 2, 2]))
    assert gather_host_rows(rows, [3])["tokens"].tolist() == rows["tokens"].tolist()
