"""`pflatents demo` end to end on the digits with a tiny training budget, then a rerun that reuses everything."""

from __future__ import annotations

import pytest


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_runs_and_reruns_reusing_model_and_store(tmp_path, prefect_api, capsys):
    from pflatents.flows.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--train-steps", "20", "--no-progress"]) == 0
    first = capsys.readouterr().out
    assert "training a 3x256 MLP" in first and "pflatents demo: done" in first
    models = list((out / "models").iterdir())
    assert len(models) == 1 and (models[0] / "model.safetensors").is_file()
    assert (out / "digits.zarr").is_dir()
    assert 0 < (out / "report" / "report.html").stat().st_size < 2_000_000  # self-contained, yet small
    from browser import find_chromium
    from test_report import FIGURES, check_in_browser

    if find_chromium() is not None:  # the digits report in a real browser: images beside the answers
        rec = check_in_browser(out / "report" / "report.html",
                               {**FIGURES, "bijection": FIGURES["bijection"] | {"images_recon"}})
        assert sum(i["section"] == "realism" and i["w"] > 300 for i in rec["images"]) == 1
    assert main(["demo", "--out", str(out), "--train-steps", "20", "--no-progress"]) == 0
    second = capsys.readouterr().out
    assert "reusing" in second and "nothing to do" in second
    assert list((out / "models").iterdir()) == models
