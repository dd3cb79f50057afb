"""`pflatents verify`: corrupted or truncated chunks of done shards are detected, re-queued and repaired by resume."""

from __future__ import annotations

import json

import numpy as np
import zarr

from extract_helpers import write_gmm_job
from pflatents.flows.cli import main
from pflatents.storage import LatentStore

ARGS = ["--shard-size", "300", "--batch-size", "100", "--solver", "rk4", "--steps", "6", "--no-progress"]


def test_verify_detects_corruption_and_resume_repairs(tmp_path, prefect_api, capsys):
    data, model = write_gmm_job(tmp_path, n=1000)
    out = tmp_path / "out.zarr"
    assert main(["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", str(out), *ARGS]) == 0
    original = zarr.open_group(str(out), mode="r")["latents"][:]
    assert main(["verify", str(out)]) == 0
    assert "4 ok, 0 corrupt" in capsys.readouterr().out

    chunk1, chunk3 = out / "latents/c/1/0", out / "latents/c/3/0"   # shard 3 is the partial last one
    raw = bytearray(chunk1.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)              # flip bytes in the middle
    chunk1.write_bytes(bytes(raw))
    chunk3.write_bytes(chunk3.read_bytes()[:20])                    # truncate
    (out / "nfe/c/0").unlink()                                      # a lost nfe chunk reads as zeros
    capsys.readouterr()

    assert main(["verify", str(out), "--check-only"]) == 1          # report only: records untouched
    assert LatentStore.open(out, mode="r").pending_shards() == []
    assert "3 corrupt" in capsys.readouterr().out
    assert main(["verify", str(out), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert (result["checked"], result["ok"]) == (4, 1)
    assert sorted(b["id"] for b in result["corrupt"]) == [0, 1, 3]
    store = LatentStore.open(out, mode="r")
    assert store.pending_shards() == [0, 1, 3]
    assert {r["id"]: r["state"] for r in map(lambda i: {"id": i, **store.shard_record(i)}, [0, 1, 3])} == {
        0: "corrupt", 1: "corrupt", 3: "corrupt"}
    assert "checksum" in store.shard_record(0)["error"]
    st = store.status()
    assert (st["done"], st["failed"], st["pending"]) == (1, 3, 0)

    assert main(["resume", str(out), "--no-progress"]) == 0
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["latents"][:], original)
    assert LatentStore.open(out, mode="r").pending_shards() == []
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    assert "4 ok, 0 corrupt" in capsys.readouterr().out
