"""A shard holds at least one batch by default, so a GPU task integrates full batches (issue 11)."""

from __future__ import annotations

import numpy as np

from pflatents.flows.coordinator import Job, locked, make_store, prepare
from pflatents.storage.layout import default_shard_size


def _job(tmp_path, n: int, shape: tuple, **kw) -> Job:
    np.save(tmp_path / "x.npy", np.zeros((n, *shape), np.float32))
    gmm = tmp_path / "g.json"
    d = int(np.prod(shape))
    import json

    gmm.write_text(json.dumps({"weights": [1.0], "means": [[0.0] * d], "covariances": [np.eye(d).tolist()]}))
    return Job(data=str(tmp_path / "x.npy"), model=f"gmm:{gmm}", out=str(tmp_path / "s.zarr"), **kw)


def test_default_shard_holds_at_least_one_batch_of_large_samples(tmp_path):
    shape = (3, 4, 4)  # 192 B per sample: 8 MiB chunks hold 43648 samples
    eight_mib = default_shard_size(4 * 3 * 4 * 4, 100_000)
    assert eight_mib == 43648
    assert prepare(_job(tmp_path, 100_000, shape, batch_size=65536)).shard_size == 65536
    assert prepare(_job(tmp_path, 100_000, shape, batch_size=1024)).shard_size == eight_mib
    assert prepare(_job(tmp_path, 50_000, shape, batch_size=65536)).shard_size == 50_000  # clipped to N
    assert prepare(_job(tmp_path, 100_000, shape, batch_size=65536, shard_size=100)).shard_size == 100


def test_an_existing_store_keeps_its_shard_size_whatever_the_batch(tmp_path):
    shape = (3, 4, 4)
    p = prepare(_job(tmp_path, 100_000, shape, batch_size=1024))
    with locked(lambda: make_store(p), p.url, {"command": "test"}) as store:
        assert store.shard_size == 43648
    assert prepare(_job(tmp_path, 100_000, shape, batch_size=65536)).shard_size == 43648
