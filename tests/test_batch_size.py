"""A store keeps its batch size, like its shard size: plain `extract`/`resume` continue a store made with
a non-default batch size (bitwise as an uninterrupted run); an explicit other batch size is refused."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from extract_helpers import cli, env_with, no_traceback, tree_hash, write_gmm_job

pytestmark = pytest.mark.slow

FIRST = ["--shard-size", "250", "--batch-size", "7", "--solver", "rk4", "--steps", "6", "--no-progress"]


def _states(out) -> list:
    g = zarr.open_group(str(out), mode="r")
    return [(g["shards"].get(f"{i:06d}").attrs.get("state") if g["shards"].get(f"{i:06d}") is not None else None)
            for i in range(g.attrs["pflatents"]["n_shards"])]


def test_plain_extract_and_resume_continue_a_store_with_its_batch_size(tmp_path, cli_env):
    data, model = write_gmm_job(tmp_path, n=1000)
    base = ["extract", "--data", str(data), "--model", f"gmm:{model}"]
    ref, out = tmp_path / "ref.zarr", tmp_path / "out.zarr"
    r = cli([*base, "--out", str(ref), *FIRST], env=cli_env)
    assert r.returncode == 0, r.stderr
    # a run that leaves shards 1-3 not done (they fail), so the store is part-done with batch size 7
    r = cli([*base, "--out", str(out), *FIRST], env=env_with(cli_env, PFLATENTS_FAIL_SHARDS="1,2,3"))
    assert r.returncode == 1 and no_traceback(r.stderr), r.stderr
    assert _states(out) == ["done", "failed", "failed", "failed"]
    # plain resume continues it (shard 3 still fails: something is left for plain extract)
    r = cli(["resume", str(out), "--no-progress"], env=env_with(cli_env, PFLATENTS_FAIL_SHARDS="3"))
    assert r.returncode == 1, r.stderr
    assert _states(out) == ["done", "done", "done", "failed"]
    # plain extract (no --batch-size, --shard-size nor solver flag) continues it, not refuses it
    r = cli([*base, "--out", str(out), "--no-progress"], env=cli_env)
    assert r.returncode == 0, r.stderr
    assert _states(out) == ["done"] * 4
    g, gr = zarr.open_group(str(out), mode="r"), zarr.open_group(str(ref), mode="r")
    assert g.attrs["pflatents"]["config"]["batch_size"] == 7
    assert g.attrs["pflatents"]["config"] == gr.attrs["pflatents"]["config"]
    np.testing.assert_array_equal(g["latents"][:], gr["latents"][:])  # bitwise, as the uninterrupted run
    np.testing.assert_array_equal(g["nfe"][:], gr["nfe"][:])
    # an explicit other batch size is refused, naming both values; the store is untouched
    before = tree_hash(out)
    r = cli([*base, "--out", str(out), "--batch-size", "100", "--no-progress"], env=cli_env)
    assert r.returncode == 2 and no_traceback(r.stderr)
    assert "batch_size: stored 7, new 100" in r.stderr
    assert tree_hash(out) == before
