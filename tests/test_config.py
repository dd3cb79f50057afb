"""The typed job settings: one list of settings and defaults, validation, the pinned JSON, old stores."""

from __future__ import annotations

import argparse

import pytest

from extract_helpers import write_gmm_job
from pflatents.flows.cli import build_parser
from pflatents.flows.coordinator import Job, locked, make_store, prepare
from pflatents.flows.run import RunSettings
from pflatents.storage import LatentStore, open_or_create
from pflatents.tasks.config import ExtractConfig, JobSettings, build_config, solver_from_dict
from pflatents.tasks.data.sources import open_source
from pflatents.tasks.errors import InputError
from pflatents.tasks.ode.pfode import SolverConfig, default_solver, default_tol
from pflatents.tasks.ode.sde import VPSDE


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_every_setting_is_a_flag_of_extract_and_serve():
    for cmd, skip in (("extract", set()), ("serve", {"incremental"})):
        dests = {a.dest for a in _subparser(cmd)._actions}
        assert set(JobSettings.model_fields) - skip <= dests, cmd
        assert set(RunSettings.model_fields) <= dests, cmd
    args = _subparser("extract").parse_args(["--data", "d", "--model", "m", "--out", "o"])
    assert all(getattr(args, k) is None for k in JobSettings.model_fields if k not in ("data", "model", "out"))


def test_job_defaults_are_the_solver_defaults():
    """The job's solver defaults and the ODE core's agree (issue 12: 1e-5 in one place, 5e-7 in another);
    the solver and its tolerances are left to the model kind (issue 21: adams4 at 1e-4 for a network,
    dopri5 at 1e-6, the core's own default, for an exact score)."""
    job, core = JobSettings(data="d", model="m", out="o"), SolverConfig()
    for name in ("steps", "grid", "t_eps"):
        assert getattr(job, name) == getattr(core, name), name
    assert job.solver is None and job.rtol is None and job.atol is None
    assert default_solver(True, VPSDE()) == core.name == "dopri5"
    assert default_tol(core.name) == core.rtol == core.atol
    assert (default_solver(False, VPSDE()), default_tol("adams4")) == ("adams4", 3e-5)


@pytest.mark.parametrize("key,value,words", [
    ("batch_size", 0, ["batch size", "--batch-size", "0"]),
    ("shard_size", -3, ["shard size", "-3"]),
    ("dtype", "float16", ["dtype", "float16"]),
    ("t_eps", -1.0, ["t eps", "-1.0"]),
    ("steps", "many", ["steps", "many"]),
])
def test_bad_settings_name_the_setting_and_the_value(key, value, words):
    with pytest.raises(InputError) as e:
        JobSettings.from_dict({"data": "d", "model": "m", "out": "o", key: value})
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_unknown_and_missing_settings():
    with pytest.raises(InputError, match="unknown job setting.*stepz"):
        JobSettings.from_dict({"data": "a", "model": "b", "out": "c", "stepz": 3})
    with pytest.raises(InputError, match="needs model"):
        JobSettings.from_dict({"data": "a", "out": "c"})
    assert JobSettings.from_dict({"data": "a", "model": "b", "out": "c", "t-eps": 0.01}).t_eps == 0.01
    with pytest.raises(InputError, match="workers.*0"):
        RunSettings.from_dict({"workers": 0})


def test_pinned_config_round_trips_as_plain_json(tmp_path):
    data, model = write_gmm_job(tmp_path, n=50)
    job = JobSettings(data=str(data), model=f"gmm:{model}", out="o")
    cfg = build_config(job, source=open_source(str(data)), shard_size=20, incremental=False)
    d = cfg.to_dict()
    assert set(d) == {"data", "model", "sde", "solver", "shard_size", "batch_size", "dtype", "precision", "compile"}
    assert d["solver"]["time_var"] == "t"  # "auto" is pinned as what the integration uses
    # an exact (gmm) score gets local error control by default (no "control" key: what it always meant)
    assert d["solver"]["rtol"] == 1e-6 and "control" not in d["solver"] and d["batch_size"] == 1024
    assert ExtractConfig.from_dict(d) == cfg and ExtractConfig.from_dict(d).to_dict() == d
    assert cfg.make_solver() == SolverConfig(rtol=1e-6, atol=1e-6, t_eps=1e-4, time_var="t", control="local")
    latent = build_config(job.model_copy(update={"control": "latent"}), source=open_source(str(data)),
                          shard_size=20, incremental=False)
    assert latent.solver["control"] == "latent" and latent.make_solver().control == "latent"


def _old_config(cfg: ExtractConfig, **solver) -> dict:
    """The config as written before the typed model: time_var 'auto' (or absent), no dtype key."""
    d = cfg.to_dict()
    d["solver"] = {**d["solver"], **solver}
    d.pop("dtype")
    return d


def test_old_pinned_configs_read_with_what_they_meant(tmp_path):
    data, model = write_gmm_job(tmp_path, n=50)
    job = JobSettings(data=str(data), model=f"gmm:{model}", out="o")
    cfg = build_config(job, source=open_source(str(data)), shard_size=20, incremental=False)
    auto = ExtractConfig.from_dict(_old_config(cfg, time_var="auto"))
    assert auto == cfg and auto.dtype == "float32"
    d = _old_config(cfg)
    del d["solver"]["time_var"]  # before time_var existed the adaptive solver stepped in s
    legacy = ExtractConfig.from_dict(d)
    assert legacy.solver["time_var"] == "s" and legacy != cfg
    assert cfg.pinned_like(_old_config(cfg, time_var="auto")) == _old_config(cfg, time_var="auto")
    # differing in meaning (the solver): the new config, with the fields that agree in the old spelling,
    # so the store's refusal names only the solver
    assert cfg.pinned_like(d) == {**d, "solver": cfg.to_dict()["solver"]}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_gmm_store_pinned_before_precision_and_compile_continues_with_the_defaults(tmp_path, dtype):
    """An exact score has no network: stores pinned before the precision and compile fields existed
    continue with default settings (their state dtype decided the precision; nothing was compiled)."""
    data, model = write_gmm_job(tmp_path, n=50)
    job = JobSettings(data=str(data), model=f"gmm:{model}", out="o", dtype=dtype)
    cfg = build_config(job, source=open_source(str(data)), shard_size=20, incremental=False)
    old = cfg.to_dict()
    del old["precision"], old["compile"]
    assert cfg.pinned_like(old) is old
    assert cfg.compile == "off" and cfg.precision == {"float32": "fp32", "float64": "fp64"}[dtype]


def test_a_store_pinned_by_the_earlier_code_keeps_opening(tmp_path):
    """A store whose pinned JSON was written with time_var 'auto' continues with the same settings,
    and is refused (naming the field) with other ones; the stored JSON is left as it was."""
    data, model = write_gmm_job(tmp_path, n=50)
    url = str(tmp_path / "old.zarr")
    p = prepare(Job(data=str(data), model=f"gmm:{model}", out=url, shard_size=20))
    old = _old_config(p.cfg, time_var="auto")
    open_or_create(url, config=old, n_samples=50, sample_shape=(8,), shard_size=20)
    with locked(lambda: make_store(p), url, {"command": "test"}) as store:
        assert store.pending_shards() == [0, 1, 2]
    assert LatentStore.open(url, mode="r").config == old
    other = prepare(Job(data=str(data), model=f"gmm:{model}", out=url, shard_size=20, rtol=1e-7))
    with pytest.raises(Exception, match="rtol"):
        with locked(lambda: make_store(other), url, {"command": "test"}):
            pass


def test_job_resolved_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = Job.from_dict({"data": "x.npy", "model": "gmm:m.json", "out": "o.zarr", "steps": 7}).resolved()
    assert job.data == str(tmp_path / "x.npy") and job.model == f"gmm:{tmp_path / 'm.json'}"
    assert job.out == str(tmp_path / "o.zarr") and job.steps == 7 and isinstance(job, Job)
    assert Job.from_dict(job.to_dict()) == job


def test_serve_settings_from_toml_and_yaml_with_flag_overrides(tmp_path):
    from pflatents.flows.coordinator import Job
    from pflatents.flows.serve import split_settings
    from pflatents.tasks.errors import InputError

    (tmp_path / "job.toml").write_text('[job]\ndata = "npydir:in"\nmodel = "gmm:m.json"\nout = "s3://b/x.zarr"\n'
                                       'solver = "rk4"\nsteps = 20\n[schedule]\ninterval = 3600\n'
                                       '[run]\nrunner = "dask://h:8786"\n')
    (tmp_path / "job.yaml").write_text("data: npydir:in\nmodel: gmm:m.json\nout: o.zarr\ncron: '0 * * * *'\n"
                                       "t-eps: 0.001\n")
    flags = dict.fromkeys(["data", "model", "out", "sde", "t_eps", "solver", "rtol", "atol", "steps", "grid",
                           "shard_size", "batch_size", "dtype", "interval", "cron", "name", "runner", "workers",
                           "device", "retries"])
    job, when, run = split_settings(str(tmp_path / "job.toml"), {**flags, "steps": 30})
    assert Job.from_dict(job) == Job(data="npydir:in", model="gmm:m.json", out="s3://b/x.zarr", solver="rk4",
                                     steps=30, incremental=True)
    assert when == {"interval": 3600} and run["runner"] == "dask://h:8786" and run["retries"] == 2
    job, when, _ = split_settings(str(tmp_path / "job.yaml"), flags)
    assert Job.from_dict(job).t_eps == 0.001 and when == {"cron": "0 * * * *"}
    with pytest.raises(InputError, match="exactly one schedule"):
        split_settings(str(tmp_path / "job.yaml"), {**flags, "interval": 5})
    with pytest.raises(InputError, match="unknown job setting"):
        Job.from_dict({"data": "a", "model": "b", "out": "c", "stepz": 3})
    (tmp_path / "bad.toml").write_text('data = "d"\nmodel = "m"\nout = "o"\ninterval = 5\n[run]\nworkers = 0\n')
    with pytest.raises(InputError, match="workers.*0"):
        split_settings(str(tmp_path / "bad.toml"), {})


@pytest.mark.parametrize("code", ["import pflatents", "from pflatents.flows.cli import build_parser; build_parser()"])
def test_import_and_help_load_neither_prefect_nor_torch(code):
    """``import pflatents`` and `pflatents --help` (every subcommand's flags, built from the settings
    models) stay light: Prefect, torch, zarr and dask load on the first real call."""
    import json
    import subprocess
    import sys

    probe = f"import sys, json\n{code}\nprint(json.dumps([m for m in ('prefect', 'torch', 'zarr', 'dask') if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_a_fixed_store_pinned_by_the_earlier_code_converts_to_incremental(tmp_path):
    """--incremental on grown data converts a fixed-length store whose pinned JSON has the older spelling."""
    import numpy as np

    data, model = write_gmm_job(tmp_path, n=80)
    x = np.load(data)
    first = tmp_path / "first.npy"
    np.save(first, x[:50])
    url = str(tmp_path / "old.zarr")
    p = prepare(Job(data=str(first), model=f"gmm:{model}", out=url, shard_size=25))
    open_or_create(url, config=_old_config(p.cfg, time_var="auto"), n_samples=50, sample_shape=(8,), shard_size=25)
    np.save(first, x)  # the same file grew by 30 samples
    grown = prepare(Job(data=str(first), model=f"gmm:{model}", out=url, shard_size=25, incremental=True))
    with locked(lambda: make_store(grown), url, {"command": "test"}) as store:
        assert store.incremental and store.n_samples == 50


def test_a_store_made_under_earlier_solver_defaults_continues_with_the_default_flags(tmp_path):
    """Solver defaults changed (t_eps 1e-5 -> 1e-4, tolerances 1e-5 -> 1e-6, latent control for networks):
    a store pinned by the earlier code with its defaults (the solver dict as it pinned it) keeps its
    solver when the job sets no solver flag; any solver flag means that solver, refused where it differs."""
    data, model = write_gmm_job(tmp_path, n=50)
    url = str(tmp_path / "old.zarr")
    p = prepare(Job(data=str(data), model=f"gmm:{model}", out=url, shard_size=25))
    old = p.cfg.to_dict()
    del old["precision"], old["compile"]
    old["solver"] = {"name": "dopri5", "t_eps": 1e-5, "rtol": 1e-5, "atol": 1e-5, "max_steps": 10_000,
                     "time_var": "auto"}  # SolverConfig().to_dict() before the defaults moved
    assert p.cfg.solver["t_eps"] != 1e-5
    open_or_create(url, config=old, n_samples=50, sample_shape=(8,), shard_size=25)
    again = prepare(Job(data=str(data), model=f"gmm:{model}", out=url))
    assert again.cfg.solver["t_eps"] == 1e-5 and again.cfg.solver["rtol"] == 1e-5
    with locked(lambda: make_store(again), url, {"command": "test"}) as store:
        assert store.pending_shards() == [0, 1]
    assert LatentStore.open(url, mode="r").config == old
    other = prepare(Job(data=str(data), model=f"gmm:{model}", out=url, t_eps=1e-4))
    with pytest.raises(Exception, match="t_eps"):
        with locked(lambda: make_store(other), url, {"command": "test"}):
            pass


def test_a_job_passed_to_a_scheduled_run_keeps_which_settings_were_given(tmp_path):
    """serve hands its runs ``job.to_dict()``: defaults must not come back as given settings (they would
    refuse a store made under other defaults, and make --latent-tol skip its pilot as 'explicit')."""
    job = Job(data="x.npy", model="gmm:m.json", out="o.zarr", latent_tol=1e-3, steps=7)
    back = Job.from_dict(job.to_dict())
    assert back == job and back.model_fields_set == {"data", "model", "out", "latent_tol", "steps"}
    assert "rtol" not in job.to_dict() and job.to_dict()["steps"] == 7
