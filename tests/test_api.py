"""The notebook API (``import pflatents``): extract, resume, analyze, open_latents, on real stores.

Tests that take ``prefect_api`` are marked integration by conftest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

import pflatents
from extract_helpers import write_gmm_job
from pflatents.tasks.config import JobSettings
from pflatents.tasks.errors import InputError
from pflatents.tasks.models.scores import GaussianMixtureScore
from pflatents.tasks.ode.batches import encode_block
from pflatents.tasks.ode.pfode import SolverConfig
from pflatents.tasks.ode.sde import VPSDE


def test_extract_open_resume_analyze(tmp_path, prefect_api, monkeypatch):
    data, model = write_gmm_job(tmp_path, n=600)
    out = str(tmp_path / "api.zarr")
    settings = dict(solver="rk4", steps=6, shard_size=200, batch_size=100)

    monkeypatch.setenv("PFLATENTS_FAIL_SHARDS", "1")
    with pytest.raises(pflatents.ExtractionFailed, match=r"\[1\]") as failed:
        pflatents.extract(str(data), f"gmm:{model}", out, retries=0, **settings)
    assert failed.value.summary["shard_ids"] == [0, 1, 2]
    monkeypatch.delenv("PFLATENTS_FAIL_SHARDS")

    done = pflatents.resume(out)
    assert done["shard_ids"] == [1] and done["samples"] == 200 and done["message"].startswith("done:")

    x = np.load(data)
    t_eps = JobSettings.model_fields["t_eps"].default  # the job's default, from the one list of defaults
    z, _, _ = encode_block(GaussianMixtureScore.from_json(model, VPSDE()), VPSDE(), x,
                           SolverConfig("rk4", steps=6, t_eps=t_eps), 100, torch.device("cpu"))
    ds = pflatents.open_latents(out)
    assert ds["latents"].dims == ("sample", "dim") and ds["latents"].shape == (600, 8)
    np.testing.assert_array_equal(ds["latents"].values, z)
    np.testing.assert_array_equal(ds["latents"].values, zarr.open_group(out, mode="r")["latents"][:])
    assert ds.attrs["pflatents"]["config"]["solver"] == {"name": "rk4", "t_eps": t_eps, "steps": 6, "grid": "logsnr"}

    again = pflatents.extract(str(data), f"gmm:{model}", out, **settings)
    assert again["samples"] == 0 and again["message"].startswith("nothing to do")

    summary = pflatents.analyze(out, prior=0) if _takes_prior() else pflatents.analyze(out)
    assert summary["n_samples"] == 600 and "verdict" in summary


def _takes_prior() -> bool:
    import inspect

    from pflatents.flows.analyze import analyze_store

    return "prior" in inspect.signature(analyze_store).parameters


def test_bad_settings_are_refused_before_anything_is_written(tmp_path):
    data, model = write_gmm_job(tmp_path, n=50)
    out = tmp_path / "bad.zarr"
    with pytest.raises(InputError, match="stepz"):
        pflatents.extract(str(data), f"gmm:{model}", str(out), stepz=3)
    with pytest.raises(InputError, match="batch size.*0"):
        pflatents.extract(str(data), f"gmm:{model}", str(out), batch_size=0)
    with pytest.raises(InputError, match="workers"):
        pflatents.extract(str(data), f"gmm:{model}", str(out), workers=0)
    assert not out.exists()
