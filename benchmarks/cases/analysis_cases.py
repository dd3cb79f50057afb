"""What `pflatents analyze` says on two real cases: the digits demo and natural-image patches.

- ``digits``: ``pflatents demo --out DIR`` (trains the demo MLP on the 1797 sklearn digits, extracts,
  analyses with ``--reconstruct all --ica``); three of the 64 pixels are always blank.
- ``patches``: 8x8 grey patches of scikit-learn's two sample photos (china.jpg, flower.jpg), each
  patch's mean removed (standard ICA preprocessing: the data span 63 of 64 dims), scaled to unit
  overall variance; ``pflatents train --holdout 0.1`` (a small MLP), ``extract``, ``analyze --ica``.

Each case's stored analysis summary (the store's ``analysis`` group) is read back and its headline
figures printed as a Markdown table: rank and degenerate directions, the latents' variance along
them, where the Gaussian total correlation lives, normality and dependence on the tested
coordinates, the prior-decode tests, and the three answers.

Usage::

    python -m benchmarks analysis_cases                                   # both cases
    python -m benchmarks analysis_cases --cases patches --patches 6000 --train-steps 400
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent


def run(args: list[str]) -> str:
    """Run the ``pflatents`` console script; stdout (raises with stderr on failure)."""
    t0 = time.perf_counter()
    out = subprocess.run([str(BIN / "pflatents"), *args], capture_output=True, text=True)
    print(f"  pflatents {' '.join(args[:2])} ... {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if out.returncode != 0:
        raise RuntimeError(f"pflatents {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def patches(n: int, seed: int = 0) -> np.ndarray:
    """n 8x8 grey patches of the sklearn sample photos, each patch's mean removed, unit overall variance."""
    from sklearn.datasets import load_sample_images
    from sklearn.feature_extraction.image import extract_patches_2d

    imgs = [im.mean(2) / 255.0 for im in load_sample_images().images]
    x = np.concatenate([extract_patches_2d(im, (8, 8), max_patches=n // len(imgs), random_state=seed + k)
                        for k, im in enumerate(imgs)]).reshape(-1, 64)
    x = x - x.mean(1, keepdims=True)
    return (x / x.std()).astype(np.float32)


def stored_summary(store: Path) -> dict:
    import zarr

    return dict(zarr.open_group(str(store), path="analysis", mode="r").attrs["pflatents_analysis"]["summary"])


def figures(name: str, s: dict) -> dict:
    data, lat, ind, nm, p = s["data"], s["latent"], s["independence"], s["normality"], s.get("prior") or {}
    top = ind["gaussian_total_correlation_top"][0]
    deg = (lat.get("degenerate_part") or [{}])
    return {"case": name, "N x D": f"{s['n_samples_store']} x {data.get('dims')}",
            "data rank": data.get("rank"), "degenerate directions": data.get("n_degenerate"),
            "first degenerate direction": deg[0].get("direction"), "its latent variance": deg[0].get("latent_variance"),
            "latent eigenvalue min": lat["eigenvalues_min"],
            "Gaussian TC, all latent dims": lat["gaussian_total_correlation_all_dims"],
            "largest TC part (eigenvalue, cos with degenerate)": f"{top['contribution']:.3g} "
            f"({top['eigenvalue']:.3g}, {top.get('cos_with_degenerate_data_direction', 'n/a')})",
            "Gaussian TC, tested coordinates (null)": f"{ind['gaussian_total_correlation']:.3g} "
            f"({ind['gaussian_total_correlation_null_mean']:.2g})",
            "max abs corr (pass line)": f"{ind['max_abs_offdiag_corr']:.3g} ({ind['corr_threshold']:.2g})",
            "max abs var - 1": nm["max_abs_var_minus_1"], "mean abs excess kurtosis": nm["mean_abs_excess_kurtosis"],
            "coordinates failing normality": f"{nm['n_dims_failing']} of {s['n_dims']}",
            "prior decodes: MMD p, C2ST accuracy, NN ratio": f"{p.get('mmd_p')}, {p.get('c2st_accuracy')}, "
            f"{p.get('nn_distance_ratio')}",
            "answers": {k: v["answer"] for k, v in s["answers"].items()}}


def digits(out: Path, steps: int) -> dict:
    run(["demo", "--out", str(out / "digits"), "--train-steps", str(steps), "--no-progress"])
    return figures("digits demo", stored_summary(out / "digits" / "digits.zarr"))


def patches_case(out: Path, n: int, steps: int) -> dict:
    d = out / "patches"
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "patches.npy", patches(n))
    if not (d / "model").exists():
        run(["train", "--data", str(d / "patches.npy"), "--out", str(d / "model"), "--steps", str(steps),
             "--hidden", "256", "--depth", "3", "--holdout", "0.1", "--no-progress"])
    run(["extract", "--data", str(d / "patches.npy"), "--model", str(d / "model"), "--out", str(d / "p.zarr"),
         "--no-progress"])
    run(["analyze", str(d / "p.zarr"), "--ica", "--ica-samples", "5000", "--overwrite", "--json",
         "--report", str(d / "report")])
    return figures("sample-photo patches, mean removed", stored_summary(d / "p.zarr"))


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks analysis_cases", description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="benchmarks/out/cases", help="where the models and stores go (kept)")
    ap.add_argument("--cases", nargs="+", default=["digits", "patches"], choices=["digits", "patches"])
    ap.add_argument("--patches", type=int, default=8000, help="number of patches (half from each photo)")
    ap.add_argument("--train-steps", type=int, default=600)
    a = ap.parse_args(argv)
    out = Path(a.workdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    if "digits" in a.cases:
        rows.append(digits(out, a.train_steps))
    if "patches" in a.cases:
        rows.append(patches_case(out, a.patches, a.train_steps))
    keys = [k for k in rows[0] if k not in ("case", "answers")]
    print("| figure | " + " | ".join(r["case"] for r in rows) + " |\n|---|" + "---|" * len(rows))
    for k in keys:
        print(f"| {k} | " + " | ".join(str(round(r[k], 4) if isinstance(r[k], float) else r[k]) for r in rows) + " |")
    for r in rows:
        print(f"\n**{r['case']}**")
        for q, text in r["answers"].items():
            print(f"- {q}: {text}")
    return rows

