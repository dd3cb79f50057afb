"""Extraction from the image sources end to end: ids and labels in the store equal the source's, the
skip list and class names are pinned, and they stay aligned through a SIGKILL + resume and through an
incremental append. Real files, real Prefect runs, real subprocesses."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

import pflatents
from extract_helpers import BIN, cli, env_with
from pflatents.flows.cli import main
from pflatents.tasks.data.sources import open_source
from pflatents.tasks.models.scores import GaussianMixtureScore
from pflatents.tasks.ode.batches import encode_block
from pflatents.tasks.ode.pfode import SolverConfig
from pflatents.tasks.ode.sde import VPSDE

RES, STEPS, SHARD = 4, 2, 4


def _gmm(path: Path, dim: int) -> Path:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(dim, dim))
    path.write_text(json.dumps({"weights": [0.5, 0.5], "means": [[0.0] * dim, (0.2 * rng.normal(size=dim)).tolist()],
                                "covariances": [np.eye(dim).tolist(), (a @ a.T / dim + 0.2 * np.eye(dim)).tolist()]}))
    return path


def _folder(root: Path, n_per_class: int = 5, start: int = 0, bad: bool = True) -> None:
    """Classes a and b, images of mixed sizes and modes (grey, RGB, palette), one corrupt file."""
    rng = np.random.default_rng(start)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + n_per_class):
            a = rng.integers(0, 256, (5 + i % 3, 4 + i % 4, 3), dtype=np.uint8)
            im = Image.fromarray(a)
            im = im.convert(("L", "RGB", "P")[i % 3])
            im.save(root / c / f"{i:03d}.png")
    if bad:
        (root / "b" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")


def _args(data: str, model: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "--data", data, "--model", f"gmm:{model}", "--out", str(out), "--resolution", str(RES),
            "--solver", "rk4", "--steps", str(STEPS), "--shard-size", str(SHARD), "--batch-size", "3",
            "--no-progress", *extra]


def _reference(src, model: Path) -> np.ndarray:
    """The latents an uninterrupted run writes: each shard's batches through the same code."""
    out = []
    for i0 in range(0, len(src), SHARD):
        b = src.read(i0, min(len(src), i0 + SHARD))
        out.append(encode_block(GaussianMixtureScore.from_json(model, VPSDE()), VPSDE(), b.x,
                                SolverConfig("rk4", steps=STEPS), 3, torch.device("cpu"), labels=b.labels)[0])
    return np.concatenate(out)


def _assert_store_is_source(out: Path, src, model: Path) -> None:
    ds = pflatents.open_latents(str(out))
    b = src.read(0, len(src))
    assert [str(s) for s in ds["sample_id"].values.tolist()] == b.ids.tolist()
    if b.labels is None:
        assert "label" not in ds.variables
    else:
        assert ds["label"].values.tolist() == b.labels.tolist()
    np.testing.assert_array_equal(ds["latents"].values, _reference(src, model))


@pytest.mark.integration
def test_imagefolder_corrupt_refused_then_skipped_and_listed(tmp_path, prefect_api, capsys):
    _folder(tmp_path / "f")
    model, out = _gmm(tmp_path / "g.json", RES * RES), tmp_path / "o.zarr"
    spec = f"imagefolder:{tmp_path / 'f'}"
    assert main(_args(spec, model, out)) == 2
    err = capsys.readouterr().err
    assert "b/zz_broken.png" in err and "--skip-bad" in err and not out.exists()
    assert main(_args(spec, model, out, "--skip-bad")) == 0
    said = capsys.readouterr().out
    assert "skipped 1 unreadable image(s)" in said and "b/zz_broken.png" in said
    data = pflatents.open_latents(str(out)).attrs["pflatents"]["config"]["data"]
    # the model takes 16 values = one 4 x 4 channel: grey images without --channels
    assert data["options"]["channels"] == 1 and data["sample_shape"] == [1, RES, RES]
    assert [s[0] for s in data["options"]["skipped"]] == ["b/zz_broken.png"] and data["classes"] == ["a", "b"]
    src = open_source(spec, **data["options"])
    assert len(src) == 10 and src.read(0, 10).labels.tolist() == [0] * 5 + [1] * 5
    _assert_store_is_source(out, src, model)
    assert main(_args(spec, model, out, "--skip-bad")) == 0  # the same job continues the store
    capsys.readouterr()
    assert main(_args(spec, model, out)) == 2                 # without --skip-bad the file is refused again
    assert "b/zz_broken.png" in capsys.readouterr().err
    assert main(_args(spec, model, out, "--skip-bad", "--interpolation", "bicubic")) == 2  # another transform
    assert "data.options" in capsys.readouterr().err


@pytest.mark.integration
def test_wds_and_parquet_extract_with_ids_and_labels(tmp_path, prefect_api):
    import datasets
    import webdataset as wds

    rng = np.random.default_rng(5)
    pixels = [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(7)]
    for k, rows in enumerate((range(0, 4), range(4, 7))):
        with wds.TarWriter(str(tmp_path / f"s{k}.tar")) as w:
            for i in rows:
                buf = io.BytesIO()
                Image.fromarray(pixels[i]).save(buf, format="PNG")
                w.write({"__key__": f"k{i}", "png": buf.getvalue(), "cls": i % 2})
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p in pixels], "label": [i % 3 for i in range(7)]})
    ds.save_to_disk(str(tmp_path / "hf"))
    model = _gmm(tmp_path / "g.json", 3 * RES * RES)
    for spec, name in ((f"wds:{tmp_path}/s{{0..1}}.tar", "w"), (f"parquet:{tmp_path / 'hf'}", "p")):
        out = tmp_path / f"{name}.zarr"
        assert main(_args(spec, model, out)) == 0
        data = pflatents.open_latents(str(out)).attrs["pflatents"]["config"]["data"]
        _assert_store_is_source(out, open_source(spec, **data["options"]), model)
    assert pflatents.open_latents(str(tmp_path / "w.zarr"))["sample_id"].values.tolist()[:2] == ["k0", "k1"]


def _states(out: Path) -> list:
    try:
        g = zarr.open_group(str(out), mode="r")
        n = g.attrs["pflatents"]["n_shards"]
    except Exception:  # noqa: BLE001 - not created yet
        return []
    return [(g["shards"].get(f"{i:06d}").attrs.get("state") if g["shards"].get(f"{i:06d}") is not None else None)
            for i in range(n)]


@pytest.mark.slow
@pytest.mark.integration
def test_ids_and_labels_survive_sigkill_and_resume(tmp_path, cli_env):
    _folder(tmp_path / "f", n_per_class=14)
    model, out = _gmm(tmp_path / "g.json", RES * RES), tmp_path / "o.zarr"
    spec = f"imagefolder:{tmp_path / 'f'}"
    proc = subprocess.Popen([str(BIN / "pflatents"), *_args(spec, model, out, "--skip-bad")],
                            env=env_with(cli_env, PFLATENTS_PAUSE_IN_WRITE="0.4"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while _states(out).count("done") < 2:
            assert time.time() < deadline and proc.poll() is None, proc.stderr.read()[-2000:] if proc.poll() else ""
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    states = _states(out)
    assert 0 < states.count("done") < len(states)
    res = cli(["resume", str(out), "--no-progress"], env=cli_env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert all(s == "done" for s in _states(out))
    data = pflatents.open_latents(str(out)).attrs["pflatents"]["config"]["data"]
    _assert_store_is_source(out, open_source(spec, **data["options"]), model)
    assert cli(["verify", str(out), "--check-only"], env=cli_env).returncode == 0


@pytest.mark.integration
def test_incremental_append_keeps_ids_and_labels_aligned(tmp_path, prefect_api, capsys):
    root = tmp_path / "f"
    _folder(root, n_per_class=5, bad=False)
    model, out = _gmm(tmp_path / "g.json", RES * RES), tmp_path / "o.zarr"
    spec = f"imagefolder:{root}"
    assert main(_args(spec, model, out, "--incremental")) == 0
    # new images sort after the old ones (the last class folder): the old samples keep their indices
    rng = np.random.default_rng(9)
    for i in range(5, 12):
        Image.fromarray(rng.integers(0, 256, (7, 6), dtype=np.uint8)).save(root / "b" / f"{i:03d}.png")
    capsys.readouterr()
    assert main(_args(spec, model, out, "--incremental")) == 0
    assert "7 new samples" in capsys.readouterr().out
    store = pflatents.open_latents(str(out))
    assert store.sizes["sample"] == 17
    data = store.attrs["pflatents"]["config"]["data"]
    src = open_source(spec, **data["options"])
    _assert_store_is_source(out, src, model)
    assert store["label"].values.tolist() == [0] * 5 + [1] * 12
    # a new image inside the extracted prefix changes its ids: refused, the store is left alone
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "a" / "000a.png")
    assert main(_args(spec, model, out, "--incremental")) == 2
    assert "changed in its first 17 samples" in capsys.readouterr().err


@pytest.mark.integration
def test_train_on_an_image_folder_then_extract_with_its_model(tmp_path, prefect_api, capsys):
    _folder(tmp_path / "f")
    spec = f"imagefolder:{tmp_path / 'f'}"
    model = tmp_path / "m"
    assert main(["train", "--data", spec, "--out", str(model), "--resolution", str(RES), "--image-channels", "1",
                 "--skip-bad", "--steps", "20", "--batch-size", "8", "--no-progress"]) == 0
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().out
    data = json.loads((model / "config.json").read_text())["data"]
    assert data["options"]["channels"] == 1 and data["classes"] == ["a", "b"] and data["n_samples"] == 10
    out = tmp_path / "o.zarr"
    assert main(["extract", "--data", spec, "--model", str(model), "--out", str(out), "--resolution", str(RES),
                 "--skip-bad", "--solver", "rk4", "--steps", "2", "--no-progress"]) == 0
    ds = pflatents.open_latents(str(out))  # grey without --channels: the model takes 16 values
    assert ds["latents"].shape == (10, 1, RES, RES) and ds["label"].values.tolist() == [0] * 5 + [1] * 5
