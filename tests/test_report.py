"""The analysis report: one self-contained HTML page with the three answers and their figures first,
the details collapsible, the Markdown twin beside it; checked in headless Chromium when installed.

The summaries here are built by the analysis's own pure functions (statistics, spectrum, realism,
reconstruction summary, ICA table, answers) on seeded arrays, so the page is the real one without a
store or a Prefect run; tests/test_analyze.py and tests/test_demo.py check the pages of real runs.
"""

from __future__ import annotations

import base64
import copy
import functools
import io
import re

import numpy as np
import pytest

from browser import external_refs, find_chromium, probe, screenshot
from pflatents.tasks.analysis.report import (QUESTIONS, answer_facts, artifact_markdown, deciding_number, num,
                                             verdict_kind, write_report)

FIGURES = {"realism": {"realism"}, "bijection": {"spectrum", "round_trip"},
           "independence": {"dependence", "qq_summary"}}
NO_CHROMIUM = ("chromium not found on PATH: install Debian's chromium package (apt-get install -y chromium; "
               ".ci/run does so where apt-get is available) to check the report in a real browser")


def built_summary(images: bool, seed: int = 0) -> tuple[dict, dict]:
    """A summary and report data from the analysis's pure functions: latents N(0, I) (n x 4), data
    with one constant dim, prior decodes, round-trip errors, the ICA table (a fresh copy each call)."""
    return copy.deepcopy(_built(images, seed))


@functools.lru_cache(maxsize=None)
def _built(images: bool, seed: int) -> tuple[dict, dict]:
    from pflatents.tasks.analysis.answers import answers
    from pflatents.tasks.analysis.ica import ica_table
    from pflatents.tasks.analysis.realism import realism
    from pflatents.tasks.analysis.reconstruct import error_summary
    from pflatents.tasks.analysis.spectrum import data_spectrum, latent_spectrum
    from pflatents.tasks.analysis.stats import StatsConfig, compute_stats
    from pflatents.tasks.analysis.summary import summarise, verdict

    rng = np.random.default_rng(seed)
    n, d = 1000, 4
    z = rng.normal(size=(n, d))
    x = np.clip(z * [0.5, 0.3, 0.4, 0.0] + [0.0, 0.1, -0.1, -1.0], -1, 1)  # dim 3 constant: rank 3 of 4
    cfg = StatsConfig(pair_dims=4, dcor_n=200, dcor_permutations=49)
    res = compute_stats(z[:, :3], cfg, scheduler="sync")
    s = summarise(res, [], cfg)
    spec = data_spectrum(n, x.mean(0), np.cov(x.T))
    sp = latent_spectrum(spec, z.mean(0), np.cov(z.T))
    s["independence"]["gaussian_total_correlation_top"] = sp["total_correlation_top"]
    dec = np.clip(rng.normal(size=(120, d)) * [0.5, 0.3, 0.4, 0.0] + [0.0, 0.1, -0.1, -1.0], -1, 1)
    s["prior"] = {"m": 120, "compared_with": "data rows (the model may have trained on them)",
                  "n_decode_failures": 0, **realism(dec, x[:120], x[120:], None, seed)}
    err = 10 ** rng.uniform(-6, -4, 200)
    s["reconstruction"] = error_summary(np.arange(200), {"recon_max_abs": err, "recon_rmse": err / 3,
                                                         "recon_nfe": np.full(200, 40.0), "recon_status": np.zeros(200)})
    mats: dict = {}
    s["ica"] = {"rows": n, "sources": None, "table": ica_table(x[:, :3], z[:, :3], None, cfg, mats)}
    s.update(data=sp["data"], latent=sp["latent"], splits={"known": False, "note": "no --holdout"},
             store="/data/crafted.zarr", rows_note="all samples", prior_std=1.0, n_samples_store=n)
    s["verdict"] = verdict(s)
    s = {"answers": answers(s), **s}
    data = {"sample": z[:500, :3], "corr": res["corr_z"], "corr_sq": res["corr_sq"],
            "ica_corr": mats["FastICA(data)"][0], "ica_corr_sq": mats["FastICA(data)"][1],
            "normality_fail": np.zeros(3, bool), "data_eigenvalues": np.linalg.eigvalsh(np.cov(x.T)),
            "recon_err": err, "prior_decodes": dec}
    if images:
        shape = (1, 2, 2)
        data.update(image_shape=shape, prior_nearest=x[:16].reshape(16, *shape), prior_nearest_distance=np.ones(16),
                    prior_nearest_reference="880 training rows",
                    images={"original": x[:16].reshape(16, *shape), "reconstructed": x[:16].reshape(16, *shape)})
    else:
        data["data_rows"] = x[:500]
    return s, data


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


@pytest.mark.parametrize("images", [False, True], ids=["flat", "images"])
def test_page_is_self_contained_answers_first_with_their_figures(tmp_path, images):
    from PIL import Image

    s, data = built_summary(images)
    paths = write_report(tmp_path, s, data)
    page = (tmp_path / "report.html").read_text()
    assert external_refs(tmp_path / "report.html") == []
    assert "http://" not in page and "https://" not in page
    pngs = _images(page)
    assert len(pngs) == len(re.findall(r"<img ", page)) >= 7
    for png in pngs:
        w, h = Image.open(io.BytesIO(png)).size
        assert w > 50 and h > 50
    # the three questions open the page, in order, each with its figures inside its own section
    starts = [page.index(f'id="{key}"') for key, _ in QUESTIONS]
    assert starts == sorted(starts) and starts[-1] < page.index("<details>")
    sections = re.findall(r'<section class="q [^"]+" id="(\w+)" data-verdict="([^"]+)">(.*?)</section>', page, re.S)
    assert [k for k, _, _ in sections] == ["realism", "bijection", "independence"]
    for key, kind, body in sections:
        assert kind in ("yes", "no", "cannot tell", "not checked")
        assert FIGURES[key] <= set(re.findall(r'data-figure="(\w+)"', body)), key
    bij = dict((k, b) for k, _, b in sections)["bijection"]
    assert ('data-figure="images_recon"' in bij) == images
    assert 'class="decide"' in bij and "3 of 4" in bij  # the deciding number: the data's rank
    assert len(page) < 1_000_000
    # the Markdown twin: the same answers first, every figure it names written beside it
    md = (tmp_path / "report.md").read_text()
    assert md.index("## 1. Does every prior draw") < md.index("## 2. Is the map") < md.index("## All key figures")
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (tmp_path / name).stat().st_size > 0, name
    assert paths == {"markdown": str(tmp_path / "report.md"), "html": str(tmp_path / "report.html")}


def test_verdicts_numbers_and_fields_an_answer_may_carry():
    assert [verdict_kind({"answer": a}) for a in ("yes, as far as 300 draws can tell", "no: decodes are told apart",
                                                  "not checked", "the data's rank is unknown")] == \
        ["yes", "no", "not checked", "cannot tell"]
    assert verdict_kind({"answer": "no: ...", "verdict": "cannot_tell"}) == "cannot tell"  # its own field wins
    assert verdict_kind(None) == "not checked"
    assert [num(v) for v in (0.123456, 1.5e-5, 123456.0, 7, 0.0, None, True)] == \
        ["0.123", "1.5e-5", "1.23e+5", "7", "0", "n/a", "yes"]
    a = {"answer": "no dependence detected at this N", "numbers": {}, "would_change": "more rows",
         "verdict": "yes", "level": 0.05, "effect": 0.012, "ci": [0.001, 0.03], "mde": 0.02,
         "deciding": {"name": "total dependence left (nats)", "value": 0.0123}}
    assert deciding_number("independence", a, {}) == ("0.0123", "total dependence left (nats)")
    assert answer_facts(a) == [("level", "0.05"), ("effect", "0.012"), ("confidence interval", "[0.001, 0.03]"),
                               ("minimum detectable effect", "0.02")]
    s, data = built_summary(False)
    s["answers"]["independence"] = a
    md = artifact_markdown(s, {"html": "/tmp/r/report.html", "markdown": "/tmp/r/report.md"})
    assert "| Are the latent dimensions independent, and can the map replace ICA? | **YES** | **0.0123** total " \
           "dependence left (nats); level 0.05; effect 0.012" in md
    assert "[report.html](file:///tmp/r/report.html)" in md and len(md.splitlines()) < 20


def _needs_chromium() -> None:
    if find_chromium() is None:
        pytest.skip(NO_CHROMIUM)


def check_in_browser(page, expect: dict[str, set[str]]) -> dict:
    """Load ``page`` in Chromium: no error, nothing fetched, every image decoded, each answer's
    figures present in its section; returns the probe's record."""
    assert external_refs(page) == []
    rec = probe(page)
    assert rec["errors"] == [] and rec["resources"] == [], rec
    assert rec["images"] and all(i["complete"] and i["data"] and i["w"] > 0 and i["h"] > 0 for i in rec["images"])
    shown = {}
    for i in rec["images"]:
        shown.setdefault(i["section"], set()).add(i["figure"])
    for key, names in expect.items():
        assert names <= shown.get(key, set()), (key, shown)
    assert [q["id"] for q in rec["sections"]] == ["realism", "bijection", "independence"]
    assert rec["details"] >= 6
    return rec


def test_page_in_chromium(tmp_path):
    _needs_chromium()
    from PIL import Image

    s, data = built_summary(True)
    write_report(tmp_path, s, data)
    check_in_browser(tmp_path / "report.html", {**FIGURES, "bijection": FIGURES["bijection"] | {"images_recon"}})
    png = screenshot(tmp_path / "report.html", tmp_path / "shot.png", 1200, 900)
    im = np.asarray(Image.open(png).convert("RGB"))
    assert im.shape[:2] == (900, 1200) and len(np.unique(im.reshape(-1, 3), axis=0)) > 50  # not blank
    bad = tmp_path / "bad.html"  # the checks catch a broken image and an external reference
    bad.write_text((tmp_path / "report.html").read_text().replace("data:image/png;base64,", "data:image/png;base64,AA", 1)
                   .replace("</main>", '<img src="https://example.invalid/x.png"></main>'))
    assert external_refs(bad) == ["<img src=https://example.invalid/x.png>"]
    rec = probe(bad)
    assert rec["errors"] and min(i["w"] for i in rec["images"]) == 0


def test_flat_gmm_store_report_and_artifact(tmp_path, prefect_api, capsys):
    """A real extraction of flat GMM data, analysed with a report: the page in Chromium, and the flow's
    markdown artifact (the three verdicts, linking the report)."""
    import json

    from prefect.artifacts import Artifact

    from extract_helpers import write_gmm_job
    from pflatents.flows.cli import main

    data, model = write_gmm_job(tmp_path, n=800, dim=3, k=2, seed=4)
    out = str(tmp_path / "s.zarr")
    assert main(["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", out, "--solver", "rk4",
                 "--steps", "16", "--shard-size", "400", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["analyze", out, "--reconstruct", "60", "--ica", "--prior", "80", "--report",
                 str(tmp_path / "rep"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    page = tmp_path / "rep" / "report.html"
    assert s["report"]["html"] == str(page)
    art = Artifact.get("pflatents-analysis")
    assert art is not None and page.as_uri() in art.data and "| Is the map a bijection? |" in art.data
    for key, _ in QUESTIONS:
        assert f"**{verdict_kind(s['answers'][key]).upper()}**" in art.data
    if find_chromium() is None:
        pytest.skip(NO_CHROMIUM)
    rec = check_in_browser(page, FIGURES)
    assert {i["figure"] for i in rec["images"] if i["section"] == "bijection"} == {"spectrum", "round_trip"}
