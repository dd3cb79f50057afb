"""The analysis report: Markdown and HTML pages with PNG plots (matplotlib Agg). No Prefect, no zarr."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["answers_markdown", "summary_table", "write_report", "markdown_to_html"]

ROUND_TRIP_NOTE = ("The round trip x -> z -> x' understates the encode error: encode and decode errors "
                   "partly cancel (docs/statistics.md). Encode error is shown separately where "
                   "an exact answer exists (a single-Gaussian model: the exact flow map is affine).")
ICA_NOTE = ("Exact PF-ODE latents approach N(0, I), so they are independent in every rotation (see the "
            "randomly rotated row): passing the independence tests does not identify sources. FastICA "
            "recovers sources up to permutation, sign and scale (Amari distance near 0); PF-ODE latents "
            "need not (Amari distance near that of a random rotation, about 0.5).")


def _fmt(v: Any) -> str:
    """A table cell."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v) or "none"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def answers_markdown(s: dict[str, Any]) -> str:
    """The three answers as a Markdown list (what each rests on and what would change it)."""
    from pflatents.tasks.analysis.answers import decision_line

    ans = s.get("answers") or {}
    lines = []
    for key, title in (("realism", "Does every prior draw decode to a realistic sample?"),
                       ("bijection", "Is the map a bijection?"),
                       ("independence", "Are the latent dimensions independent, and can the map replace ICA?")):
        a = ans.get(key)
        if a:
            lines.append(f"- **{title}** {a['answer'][0].upper() + a['answer'][1:]}. *What would change it:* "
                         f"{a['would_change']}.")
            if decision_line(a):
                lines.append(f"  *{decision_line(a)}.*")
    return "\n".join(lines)


def summary_table(s: dict[str, Any]) -> str:
    """The three answers, then the key figures with their pass lines (also the Prefect artifact)."""
    nm, ind, rec = s["normality"], s["independence"], s.get("reconstruction") or {}
    data, prior = s.get("data") or {}, s.get("prior") or {}
    rows = [["samples x coordinates tested", f"{s['n_samples']} x {s['n_dims']}",
             (s.get("prior_target") or {}).get("target", "N(0, I)").split(":")[0]]]
    if data.get("available"):
        rows.append(["data rank (degenerate directions)", f"{data['rank']} of {data['dims']} ({data['n_degenerate']})",
                     f"variance floor {data['variance_floor']:.2g}"])
    if prior.get("mmd") is not None:
        rows += [["prior decodes: MMD (p)", f"{prior['mmd']:.3g} ({prior['mmd_p']:.2g})", "p > alpha"],
                 ["prior decodes: classifier accuracy (p)",
                  f"{prior['c2st_accuracy']:.3f} ({prior['c2st_p']:.2g})" if prior.get("c2st_accuracy") is not None
                  else "not run (too few draws)", "~0.5"],
                 ["prior decodes: nearest-training distance ratio", prior.get("nn_distance_ratio"), "~1 (<< 1: copies)"]]
    rows += [
            ["max abs off-diagonal corr", ind["max_abs_offdiag_corr"], f"< {ind['corr_threshold']:.4g}"],
            ["pairs over threshold", ind["n_pairs_over_threshold"], "0"],
            ["Gaussian total correlation", ind["gaussian_total_correlation"],
             f"null mean {ind['gaussian_total_correlation_null_mean']:.3g}; Bartlett p {ind['bartlett_p']:.3g}"],
            ["max abs corr of squares", ind["max_abs_offdiag_corr_of_squares"], f"< {ind['corr_threshold']:.4g}"],
            ["max abs corr of abs", ind["max_abs_offdiag_corr_of_abs"], f"< {ind['corr_threshold']:.4g}"],
            ["HSIC pairs rejected", ind["hsic_n_pairs_rejected"], "0"],
            ["binned MI pairs rejected", ind["mi_n_pairs_rejected"], "0"],
            ["dCor pairs rejected", f"{ind['dcor_n_rejected']} of {ind['dcor_pairs_tested']}", "0"],
            ["max abs mean", nm["max_abs_mean"], ""], ["max abs var - 1", nm["max_abs_var_minus_1"], ""],
            ["mean abs excess kurtosis", nm["mean_abs_excess_kurtosis"], f"~ < {nm['kurtosis_threshold']:.3g}"],
            ["dims failing normality", nm["n_dims_failing"], "0"]]
    if rec:
        rows += [["round-trip max abs error", rec.get("max_abs_error"), ""], ["round-trip RMSE", rec.get("rmse"), ""]]
    stab = s.get("stability")
    if stab:  # `--stability N`: drift against a ~10x more accurate re-encode
        rows.append([f"latent stability p50 / p99 / max ({stab['n']} samples)",
                     f"{stab['p50']:.2g} / {stab['p99']:.2g} / {stab['max']:.2g}",
                     f"p99 <= {stab['target']:g}: {'yes' if stab['meets_target'] else 'NO'}"])
    head = answers_markdown(s)
    level = (s["independence"].get("family_level") or s.get("alpha", 0.05))
    table = _table(["statistic", "value", f"pass line (each family at {level:.3g}, Bonferroni)"], rows)
    return (head + "\n\n" if head else "") + table + f"\n\n**Verdict:** {s['verdict']}\n"


def _plots(out: Path, data: dict[str, Any]) -> list[tuple[str, str]]:
    """Write the PNGs; returns (title, file name) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats

    made: list[tuple[str, str]] = []
    z = data["sample"]
    k = min(16, z.shape[1])
    cols = min(4, k)
    rows = -(-k // cols)
    grid = np.linspace(-4, 4, 200)
    for name, title in (("hist.png", "Per-dim histograms vs N(0,1)"), ("qq.png", "QQ plots vs N(0,1)")):
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.4 * rows), squeeze=False)
        for j, ax in enumerate(axes.ravel()):
            if j >= k:
                ax.axis("off")
                continue
            if name == "hist.png":
                ax.hist(z[:, j], bins=50, range=(-4, 4), density=True, alpha=0.6)
                ax.plot(grid, stats.norm.pdf(grid), "k-", lw=1)
            else:
                q = np.sort(z[:, j])
                ax.plot(stats.norm.ppf((np.arange(len(q)) + 0.5) / len(q)), q, ".", ms=2)
                ax.plot([-4, 4], [-4, 4], "k-", lw=1)
            ax.set_title(f"dim {j}", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=80)
        plt.close(fig)
        made.append((title, name))
    for key, name, title in (("corr", "corr.png", "Correlation matrix"),
                             ("corr_sq", "corr_squares.png", "Correlation of squares")):
        fig, ax = plt.subplots(figsize=(5, 4))
        r = data[key].copy()
        np.fill_diagonal(r, 0.0)
        lim = max(float(np.abs(r).max()), 1e-3)
        im = ax.imshow(r, cmap="RdBu_r", vmin=-lim, vmax=lim)
        fig.colorbar(im)
        ax.set_title(f"{title} (diagonal zeroed)", fontsize=9)
        fig.savefig(out / name, dpi=80)
        plt.close(fig)
        made.append((title, name))
    if data.get("recon_err") is not None:
        fig, ax = plt.subplots(figsize=(5, 3))
        e = np.asarray(data["recon_err"], dtype=np.float64)
        ax.hist(np.log10(np.maximum(e, 1e-12)), bins=40)
        ax.set_xlabel("log10 per-sample max abs round-trip error")
        fig.tight_layout()
        fig.savefig(out / "recon_error.png", dpi=80)
        plt.close(fig)
        made.append(("Reconstruction error", "recon_error.png"))
    made += _image_grids(out, data.get("images") or {}, plt)
    return made


def _to_image(x: np.ndarray) -> np.ndarray:
    """CHW in [-1, 1] -> HWC (or HW) in [0, 1]."""
    img = np.clip((np.asarray(x, dtype=np.float64) + 1) / 2, 0, 1)
    return img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)


def _image_grids(out: Path, images: dict[str, np.ndarray], plt: Any) -> list[tuple[str, str]]:
    """Originals beside reconstructions, and decodes of fresh prior draws."""
    made = []
    for name, title, keys in (("images_recon.png", "Originals (top) and reconstructions (bottom)",
                               ("original", "reconstructed")),
                              ("images_prior.png", "Decodes of fresh prior draws", ("prior",))):
        rows = [images[k] for k in keys if k in images]
        if not rows or len(rows[0]) == 0:
            continue
        n = len(rows[0])
        fig, axes = plt.subplots(len(rows), n, figsize=(1.2 * n, 1.2 * len(rows)), squeeze=False)
        for r, row in enumerate(rows):
            for c in range(n):
                axes[r, c].imshow(_to_image(row[c]), cmap="gray", vmin=0, vmax=1)
                axes[r, c].axis("off")
        fig.savefig(out / name, dpi=80)
        plt.close(fig)
        made.append((title, name))
    return made


def _data_blocks(s: dict[str, Any]) -> list[str]:
    """Degenerate directions, the latent spectrum and where the total correlation lives."""
    data, lat = s.get("data") or {}, s.get("latent") or {}
    if not data.get("available"):
        return ["## Data and latent spectrum", f"The data were not read ({data.get('reason') or 'unknown'}): the "
                "latents are tested against N(0, I) on every dim, degenerate directions included."]
    text = (f"The data span {data['rank']} of {data['dims']} dims (variance floor {data['variance_floor']:.2g}; "
            f"{data['n_constant_dims']} constant dims). Every statistic above is on the {s['n_dims']} "
            "non-degenerate coordinates; the degenerate part is reported here on its own.")
    blocks = ["## Data and latent spectrum", text]
    if lat.get("degenerate_part"):
        blocks.append(_table(["degenerate data direction", "latent variance", "prior variance", "latent mean"],
                             [[d["direction"], d["latent_variance"], d["prior_variance"], d["latent_mean"]]
                              for d in lat["degenerate_part"]]))
    top = s["independence"].get("gaussian_total_correlation_top") or []
    blocks.append(f"Latent covariance eigenvalues {lat.get('eigenvalues_min', 0):.3g} .. "
                  f"{lat.get('eigenvalues_max', 0):.3g}. Gaussian total correlation over all latent dims "
                  f"{lat.get('gaussian_total_correlation_all_dims', 0):.3g}, split into -1/2 log lambda per "
                  "eigendirection of the latent correlation matrix; the largest parts:")
    blocks.append(_table(["eigenvalue", "contribution", "direction", "cos with a degenerate data direction"],
                         [[t["eigenvalue"], t["contribution"], t["direction"],
                           t.get("cos_with_degenerate_data_direction")] for t in top]))
    return blocks


def _prior_blocks(s: dict[str, Any]) -> list[str]:
    """Realism of prior decodes and the training / held-out comparison."""
    p, sp = s.get("prior") or {}, s.get("splits") or {}
    blocks = ["## Decodes of fresh prior draws"]
    if p.get("skipped"):
        blocks.append(f"Not run: {p['skipped']}.")
    elif p:
        blocks += [f"{p['m']} seeded prior draws decoded ({p['n_decode_failures']} solver failures) and compared with "
                   f"{p['n_heldout']} {p['compared_with']}" + (", decodes rounded to the data's grid" if p["requantised"]
                                                               else "") + ".",
                   _table(["test", "value", "p-value", "reading"],
                          [["MMD (RBF, median bandwidth)", p["mmd"], p["mmd_p"], "p < alpha: told apart"],
                           ["classifier two-sample test", p["c2st_accuracy"], p["c2st_p"], p["c2st_classifier"]],
                           ["nearest-training distance, decodes / held-out", p["nn_distance_ratio"], None,
                            "<< 1: decodes copy training samples"]])]
    if sp.get("known"):
        keys = ["n", "max_abs_offdiag_corr", "gaussian_total_correlation", "gaussian_total_correlation_null_mean",
                "max_abs_var_minus_1", "mean_abs_excess_kurtosis", "n_dims_failing", "dependence_tests_rejecting",
                *(k for k in ("round_trip_n_checked", "round_trip_max_abs_error") if k in sp["train"])]
        blocks += ["## Training rows vs held-out rows", sp["note"] + ".",
                   _table(["figure", "training rows", "held-out rows"], [[k, sp["train"][k], sp["heldout"][k]] for k in keys]
                          + [["eps-loss (from training)", sp.get("eval_loss_train"), sp.get("eval_loss_heldout")]])]
    elif sp.get("note"):
        blocks.append(f"Training vs held-out rows: not compared ({sp['note']}).")
    return blocks


def _sections(s: dict[str, Any], plots: list[tuple[str, str]]) -> list[str]:
    """The report body as Markdown blocks: the answers and key figures first."""
    nm, ind = s["normality"], s["independence"]
    target = (s.get("prior_target") or {}).get("target", "N(0, I)")
    blocks = [f"# pflatents analysis\n\nStore `{s['store']}`: {s['n_samples']} samples, {s['n_dims']} coordinates"
              f" tested ({s['rows_note']}).", summary_table(s), "## Notes", "\n".join([
                  f"- Target: {target}. Latents are divided by the SDE's prior std ({s['prior_std']:g}) and "
                  "standardised by p_T's mean and covariance where the data could be read.",
                  f"- Each answer is one decision at level {s['alpha']}: the six dependence families (Bonferroni over "
                  f"pairs) are each tested at {s['alpha']}/6, Bonferroni across families, so on exactly independent "
                  "latents the verdict says \"dependent\" at most that often; prior decodes: MMD and the classifier "
                  "test, Bonferroni over the two. Normality: Bonferroni over coordinates and the 6 tests; distance "
                  "correlation is descriptive (not in the verdict).",
                  f"- HSIC and binned MI use {ind['pair_test_dims']} coordinates; distance correlation uses a seeded "
                  "subsample of rows and pairs (the flagged ones first)."]),
              *_data_blocks(s), "## Normality",
              _table([f"test (alone, level alpha/(6D) = {nm.get('per_test_level', 0):.3g})", "dims failing"],
                     [[k, v] for k, v in nm["n_dims_failing_by_test"].items()]),
              f"Failing dims: {_fmt(nm['failing_dims'])}. Max KS {nm['max_ks']:.4g} (5%: {nm['ks_threshold_5pct']:.4g}),"
              f" max AD {nm['max_ad']:.4g} (5%: 2.492).", "## Distance correlation (subsample)",
              _table(["pair", "dCor", "p", "rejected"],
                     [[t["pair"], t["dcor"], t["p"], t["rejected"]] for t in ind["dcor_tests"]])]
    blocks += _prior_blocks(s)
    rec = s.get("reconstruction")
    if rec and rec.get("max_abs_error") is not None:
        blocks += ["## Reconstruction", ROUND_TRIP_NOTE,
                   _table(["figure", "value"], [[k, v] for k, v in rec.items() if not isinstance(v, (dict, list))]),
                   _table(["quantile", "max abs error"], [[k, v] for k, v in rec["max_abs_error_quantiles"].items()]),
                   _table(["worst sample", "max abs error", "rmse"],
                          [[w["sample"], w["max_abs_error"], w["rmse"]] for w in rec["worst_samples"]])]
    if s.get("ica"):
        from pflatents.tasks.analysis.answers import ica_sentence

        blocks += ["## ICA comparison", ica_sentence(s["ica"]["table"]), ICA_NOTE, _table(
            ["representation", "rows", "max abs corr", "max abs corr of squares", "mean abs excess kurtosis",
             "Amari distance to sources", "dependence tests rejecting"],
            [[r["representation"], r["n"], r["max_abs_corr"], r["max_abs_corr_of_squares"],
              r["mean_abs_excess_kurtosis"], r["amari_distance"], r["dependence_tests_rejecting"]]
             for r in s["ica"]["table"]])]
    blocks += ["## Plots"] + [f"### {t}\n\n![{t}]({f})" for t, f in plots]
    return blocks


def markdown_to_html(md: str, title: str = "pflatents analysis") -> str:
    """The report's Markdown as a standalone HTML page (markdown-it-py, CommonMark plus tables; raw HTML off)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(md)
    style = "body{font-family:sans-serif;max-width:60em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + body + "\n</body></html>\n")


def write_report(directory: str | Path, summary: dict[str, Any], data: dict[str, Any]) -> dict[str, str]:
    """Write report.md, report.html and the PNGs into ``directory``; returns their paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    md = "\n\n".join(_sections(summary, _plots(out, data))) + "\n"
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(markdown_to_html(md))
    return {"markdown": str(out / "report.md"), "html": str(out / "report.html")}
