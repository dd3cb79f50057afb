"""Store format 2: a store written in format 1 (tests/data/format1.zarr, committed as written by the
code of 2026-12-04 before the bump) opens, reads and resumes, and is upgraded once, bitwise equal to
a store made today.

The fixture: ``write_gmm_job(/tmp/pflatents-format1-fixture, n=40, dim=3, k=2, seed=0)`` and
``PFLATENTS_FAIL_SHARDS=2 pflatents extract --data .../x.npy --model gmm:.../gmm.json --out
tests/data/format1.zarr --shard-size 10 --batch-size 10 --solver rk4 --steps 8``: shards 0, 1, 3 done,
shard 2 failed. Its pinned paths are absolute, so the test writes the same data and model there again
(the same bytes: the pinned fingerprint and content hash check it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from extract_helpers import write_gmm_job
from pflatents.flows.cli import main
from pflatents.storage import FORMAT_VERSION, LatentStore, config_hash
from pflatents.tasks.config import ExtractConfig, migrate

FIXTURE = Path(__file__).parent / "data" / "format1.zarr"
FIXTURE_DATA = Path("/tmp/pflatents-format1-fixture")
ARGS = ["--shard-size", "10", "--batch-size", "10", "--solver", "rk4", "--steps", "8", "--no-progress"]


@pytest.fixture
def old_store(tmp_path):
    FIXTURE_DATA.mkdir(exist_ok=True)
    data, model = write_gmm_job(FIXTURE_DATA, n=40, dim=3, k=2, seed=0)
    out = tmp_path / "old.zarr"
    shutil.copytree(FIXTURE, out)
    return data, model, out


def _attrs(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"]["pflatents"]


def _set_attrs(store: Path, meta: dict) -> None:
    """Rewrite the store's attrs with ``meta`` (its config hash made to match, as the writer did)."""
    meta = {**meta, "config_hash": config_hash(meta["config"])}
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"]["pflatents"] = meta
    (store / "zarr.json").write_text(json.dumps(doc))


def test_a_format1_store_reads_without_being_changed(old_store):
    _, _, out = old_store
    before = (out / "zarr.json").read_bytes()
    store = LatentStore.open(out, mode="r")
    assert FORMAT_VERSION == 2 and store.format_version == 1
    cfg = ExtractConfig.from_store(store)
    assert cfg.solver.name == "rk4" and cfg.solver.steps == 8 and cfg.data.n_samples == 40
    assert cfg.model.kind == "gmm" and cfg.make_sde().name == "vp"
    assert [store.shard_record(i)["state"] for i in range(4)] == ["done", "done", "failed", "done"]
    assert (out / "zarr.json").read_bytes() == before


def test_resume_upgrades_a_format1_store_once_and_matches_a_new_store_bitwise(old_store, tmp_path, prefect_api):
    data, model, out = old_store
    old_latents = LatentStore.open(out, mode="r").latents_array()[:]
    assert main(["resume", str(out), "--no-progress"]) == 0
    meta = _attrs(out)
    assert meta["format_version"] == 2 and meta["upgraded"]["from"] == 1
    store = LatentStore.open(out, mode="r")
    assert [store.shard_record(i)["state"] for i in range(4)] == ["done"] * 4

    fresh = tmp_path / "fresh.zarr"
    assert main(["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", str(fresh), *ARGS]) == 0
    new = LatentStore.open(fresh, mode="r")
    assert new.format_version == 2 and new.config == store.config and new.config_hash == store.config_hash
    z, z_new = store.latents_array()[:], new.latents_array()[:]
    # the shard the resume computed is bit for bit the new store's
    assert z[20:30].tobytes() == z_new[20:30].tobytes()
    kept = np.r_[0:20, 30:40]  # the shards done before the upgrade were not rewritten
    assert old_latents[kept].tobytes() == z[kept].tobytes()
    # those were computed where the fixture was written (2026-11-30's VM): bit for bit the same on a CPU
    # of that kind; another instruction set (this test failed bitwise on a Sapphire Rapids VM, as the
    # seeded training digests did) rounds the score's float32 sums differently, by a few ulps
    np.testing.assert_allclose(z[kept], z_new[kept], rtol=0, atol=1e-6)

    # once: a second resume finds nothing to do and leaves the upgraded attrs as they are
    assert main(["resume", str(out), "--no-progress"]) == 0
    assert _attrs(out)["upgraded"] == meta["upgraded"] and _attrs(out)["format_version"] == 2


def test_an_earlier_spelling_is_migrated_to_the_explicit_form(old_store, prefect_api):
    """A format-1 store pinned before precision/compile/dtype existed: extract with the same flags
    continues it, and the upgrade writes those settings out."""
    data, model, out = old_store
    meta = _attrs(out)
    for k in ("precision", "compile", "dtype"):
        del meta["config"][k]
    _set_attrs(out, meta)
    canonical = migrate(meta["config"], 1)
    assert canonical["solver"] == meta["config"]["solver"] and canonical.get("precision") == "fp32"
    assert main(["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", str(out), *ARGS]) == 0
    upgraded = _attrs(out)
    assert upgraded["format_version"] == 2
    assert {k: upgraded["config"][k] for k in ("precision", "compile", "dtype")} == \
        {"precision": "fp32", "compile": "off", "dtype": "float32"}
    assert ExtractConfig.from_dict(upgraded["config"], 2) == ExtractConfig.from_dict(meta["config"], 1)


def test_a_refused_job_leaves_a_format1_store_untouched(old_store, prefect_api):
    data, model, out = old_store
    before = (out / "zarr.json").read_bytes()
    assert main(["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", str(out),
                 *ARGS[:-3], "--steps", "9", "--no-progress"]) != 0
    assert (out / "zarr.json").read_bytes() == before
