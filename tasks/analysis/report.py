"""The analysis report: one self-contained HTML page (figures embedded, styles inline, no network)
and its Markdown twin (with the same figures as PNG files beside it). No Prefect, no zarr.

The page opens with the three questions, each a coloured verdict (yes / no / cannot tell), the one
number that decides it and its figure beside it; the details follow in collapsible sections.
Fields the answers may carry beyond ``answer`` / ``numbers`` / ``would_change`` (a stated level, an
effect with its interval, a minimum detectable effect, ...) are shown generically under the verdict.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pflatents.tasks.analysis import figures as F

__all__ = ["QUESTIONS", "answers_markdown", "summary_table", "artifact_markdown", "verdict_kind", "deciding_number",
           "answer_facts", "report_figures", "report_markdown", "report_html", "write_report", "markdown_to_html",
           "num"]

QUESTIONS = (("realism", "Does every prior draw decode to a realistic sample?"),
             ("bijection", "Is the map a bijection?"),
             ("independence", "Are the latent dimensions independent, and can the map replace ICA?"))
VERDICTS = ("yes", "no", "cannot tell", "not checked")

ROUND_TRIP_NOTE = ("The round trip x -> z -> x' understates the encode error: encode and decode errors "
                   "partly cancel (docs/statistics.md). Encode error is shown separately where "
                   "an exact answer exists (a single-Gaussian model: the exact flow map is affine).")
ICA_NOTE = ("Exact PF-ODE latents approach N(0, I), so they are independent in every rotation (see the "
            "randomly rotated row): passing the independence tests does not identify sources. FastICA "
            "recovers sources up to permutation, sign and scale (Amari distance near 0); PF-ODE latents "
            "need not (Amari distance near that of a random rotation, about 0.5).")


def num(v: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant digits (scientific notation when tiny or huge)."""
    if v is None:
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    v = float(v)
    if v == 0 or not np.isfinite(v):
        return "0" if v == 0 else str(v)
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        mant, exp = f"{v:.{max(digits - 1, 0)}e}".split("e")
        mant = mant.rstrip("0").rstrip(".") if "." in mant else mant
        return f"{mant}e{int(exp):+d}"
    return f"{v:.{digits}g}"


def _fmt(v: Any) -> str:
    """A table cell."""
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v) or "none"
    if isinstance(v, dict):
        return "; ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    if v is None or isinstance(v, (bool, int, float, np.number, np.bool_)):
        return num(v)
    return str(v).replace("|", "\\|")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---- the answers: verdict, deciding number, generic extra fields ------------------------------

def verdict_kind(a: dict[str, Any] | None) -> str:
    """"yes", "no", "cannot tell" or "not checked": the answer's own ``verdict`` (or ``kind``) when it
    carries one, else read from the start of its sentence."""
    if not a:
        return "not checked"
    for key in ("verdict", "kind"):
        v = str(a.get(key) or "").strip().lower().replace("_", " ")
        if v in VERDICTS:
            return v
    text = str(a.get("answer") or "").strip().lower()
    if text.startswith("not checked"):
        return "not checked"
    if text.startswith(("yes", "no dependence detected")):
        return "yes"
    if text.startswith(("no", "dependent")):
        return "no"
    return "cannot tell"


def _named(d: Any) -> tuple[str, str] | None:
    """(value, label) of a deciding-number field: a dict {name, value, threshold, text}, a
    (name, value) pair or a bare value."""
    if d is None:
        return None
    if isinstance(d, dict):
        value = next((d[k] for k in ("value", "estimate", "number") if k in d), None)
        label = next((str(d[k]) for k in ("name", "label", "statistic", "what") if d.get(k)), "")
        thr = d.get("threshold")
        if thr is not None and isinstance(value, (int, float)):  # a p-value against the level
            return ("p ≈ 0" if value == 0 else f"p = {num(value, 2)}",
                    f"{'<' if value < thr else '≥'} level {num(thr)}: " + label)
        return (value if isinstance(value, str) else num(value)), label
    if isinstance(d, (list, tuple)) and len(d) == 2:
        return (d[1] if isinstance(d[1], str) else num(d[1])), str(d[0])
    return (d if isinstance(d, str) else num(d)), ""


def deciding_number(key: str, a: dict[str, Any] | None, s: dict[str, Any]) -> tuple[str, str] | None:
    """The one number that decides question ``key``, as (value, what it is): the answer's own
    ``deciding`` field when it has one, else the summary figure the verdict rests on."""
    for field in ("deciding", "deciding_number", "decisive"):
        if a and a.get(field) is not None:
            return _named(a[field])
    if verdict_kind(a) == "not checked" and a:
        return None
    if key == "realism":
        p = s.get("prior") or {}
        if p.get("c2st_accuracy") is not None:
            return (f"{p['c2st_accuracy']:.2f}", f"accuracy of a classifier telling decodes from data "
                    f"(0.5: it cannot; p {num(p.get('c2st_p'), 2)})")
        if p.get("mmd_p") is not None:
            return num(p["mmd_p"], 2), "MMD two-sample p-value (small: told apart)"
        return None
    if key == "bijection":
        data, rec = s.get("data") or {}, s.get("reconstruction") or {}
        if data.get("available") and data.get("n_degenerate"):
            return f"{data['rank']} of {data['dims']}", "data dims spanned: the rest carry no data to map"
        if rec.get("max_abs_error") is not None:
            return num(rec["max_abs_error"], 2), f"largest round-trip error x -> z -> x' ({rec.get('n_checked')} samples)"
        if data.get("available"):
            return f"{data['rank']} of {data['dims']}", "data dims spanned (round trip not checked)"
        return None
    from pflatents.tasks.analysis.summary import independence_failures

    ind = s.get("independence") or {}
    try:
        bad = independence_failures(ind)
    except KeyError:
        return None
    return str(len(bad)), ("dependence test families reject" + (f": {', '.join(bad)}" if bad else "")
                           + f" (each at level {num(s.get('alpha'))})")


_SKIP = {"answer", "numbers", "would_change", "why", "verdict", "kind", "deciding", "deciding_number", "decisive",
         "comparison"}
_LABELS = {"alpha": "level", "level": "level", "effect": "effect", "ci": "confidence interval",
           "effect_ci": "confidence interval", "mde": "minimum detectable effect",
           "minimum_detectable_effect": "minimum detectable effect", "power": "power", "n": "rows",
           "replace_ica": "can it replace ICA?"}
_PLAIN_UNITS = ("", "accuracy", "variance ratio", "data units")


def _effect_text(e: dict[str, Any]) -> str:
    """An effect {name, value, ci, ci_level, unit} or a minimum detectable effect {..., power, text}."""
    if e.get("text") and "ci" not in e:
        return str(e["text"])
    unit = "" if e.get("unit") in _PLAIN_UNITS or e.get("unit") is None else f" {e['unit']}"
    text = num(e.get("value")) + unit
    ci = e.get("ci")
    if ci is not None and len(ci) == 2:
        text += f" ({num(e.get('ci_level', 0.95) * 100, 2)}% CI {num(ci[0])} to {num(ci[1])})"
    if e.get("power") is not None:
        text += f" ({num(e['power'] * 100, 2)}% power)"
    return text + (f": {e['name']}" if e.get("name") else "")


def answer_facts(a: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(label, value) of every field an answer carries beyond its sentence, numbers and deciding
    number (level, effect with its interval, minimum detectable effect, ...), in order."""
    if not a:
        return []
    out = []
    for k, v in a.items():
        if k in _SKIP or v is None or v == "" or v == [] or v == {}:
            continue
        label = _LABELS.get(k, k.replace("_", " "))
        if isinstance(v, dict) and "value" in v:
            text = _effect_text(v)
        elif isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
            text = f"[{num(v[0])}, {num(v[1])}]"
        else:
            text = _fmt(v)
        out.append((label, text))
    return out


def _sentence(text: str) -> str:
    text = str(text).strip()
    return (text[0].upper() + text[1:]).rstrip(".") + "." if text else ""


def answers_markdown(s: dict[str, Any]) -> str:
    """The three answers as a Markdown list (what each rests on and what would change it)."""
    from pflatents.tasks.analysis.answers import decision_line

    ans = s.get("answers") or {}
    lines = []
    for key, title in QUESTIONS:
        a = ans.get(key)
        if a:
            lines.append(f"- **{title}** {_sentence(a['answer'])} *What would change it:* {_sentence(a['would_change'])}")
            if decision_line(a):
                lines.append(f"  *{decision_line(a)}.*")
    return "\n".join(lines)


def artifact_markdown(s: dict[str, Any], report: dict[str, str] | None = None) -> str:
    """The Prefect artifact: each question's verdict and deciding number, a link to the report."""
    ans = s.get("answers") or {}
    lines = [f"### pflatents analysis of `{s.get('store')}`", "",
             f"{s.get('n_samples')} samples x {s.get('n_dims')} coordinates tested; {s.get('rows_note', '')}.", "",
             "| question | verdict | deciding number |", "|---|---|---|"]
    for key, title in QUESTIONS:
        a = ans.get(key)
        d = deciding_number(key, a, s)
        facts = "; ".join(f"{k} {v}" for k, v in answer_facts(a))
        cell = (f"**{d[0]}** {d[1]}" if d else "n/a") + (f"; {facts}" if facts else "")
        lines.append(f"| {title} | **{verdict_kind(a).upper()}** | {cell.replace('|', '/')} |")
    lines += ["", f"**Verdict:** {s.get('verdict', '')}"]
    if report and report.get("html"):
        path = Path(report["html"])
        lines += ["", f"Full report (figures, every table): [{path.name}]({path.as_uri()}) (`{path}`); "
                      f"Markdown twin `{report.get('markdown')}`."]
    return "\n".join(lines) + "\n"


def _key_table(s: dict[str, Any]) -> str:
    """The key figures with their pass lines."""
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
            ["max abs off-diagonal corr", ind["max_abs_offdiag_corr"], f"< {ind['corr_threshold']:.3g}"],
            ["pairs over threshold", ind["n_pairs_over_threshold"], "0"],
            ["Gaussian total correlation", ind["gaussian_total_correlation"],
             f"null mean {ind['gaussian_total_correlation_null_mean']:.3g}; Bartlett p {ind['bartlett_p']:.3g}"],
            ["max abs corr of squares", ind["max_abs_offdiag_corr_of_squares"], f"< {ind['corr_threshold']:.3g}"],
            ["max abs corr of abs", ind["max_abs_offdiag_corr_of_abs"], f"< {ind['corr_threshold']:.3g}"],
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
    level = (s.get("independence") or {}).get("family_level") or s.get("alpha", 0.05)
    return _table(["statistic", "value", f"pass line (each family at {num(level)}, Bonferroni)"], rows)


def summary_table(s: dict[str, Any]) -> str:
    """The three answers, then the key figures with their pass lines (what the CLI prints)."""
    head = answers_markdown(s)
    return (head + "\n\n" if head else "") + _key_table(s) + f"\n\n**Verdict:** {s['verdict']}\n"




# ---- figures -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Figure:
    """One PNG of the report: its file name (beside report.md), title, caption and bytes."""

    name: str
    title: str
    caption: str
    png: bytes


def _conditioned(p: dict[str, Any]) -> str:
    """What a class-conditional model's decodes were conditioned on, as a clause ('' when unconditional)."""
    return f", conditioned on {p['conditioned_on']}" if p.get("conditioned_on") else ""


def _realism_figures(s: dict[str, Any], data: dict[str, Any]) -> list[Figure]:
    p = s.get("prior") or {}
    dec = data.get("prior_decodes")
    if dec is None or not len(dec):
        return []
    against = p.get("compared_with", "data rows")
    if data.get("prior_nearest") is not None and data.get("image_shape"):
        shape = tuple(data["image_shape"])
        k = min(16, len(dec), len(data["prior_nearest"]))
        top = np.asarray(dec[:k]).reshape(k, *shape)
        bottom = np.asarray(data["prior_nearest"][:k]).reshape(k, *shape)
        dist = data.get("prior_nearest_distance")
        notes = [f"d {num(v, 2)}" for v in dist[:k]] if dist is not None else None
        ref = data.get("prior_nearest_reference", "training rows")
        return [Figure("realism.png", "Prior decodes and their nearest training samples",
                       f"Top: decodes of {k} fresh prior draws{_conditioned(p)}"
                       + (" (rounded to the data's grid, as the tests see them)" if p.get("requantised") else "")
                       + f". Below each: its nearest neighbour among "
                       f"{ref} (Euclidean distance d). A copy would look identical with d near 0.",
                       F.image_pairs(top, bottom, ("decode", "nearest"), notes))]
    rows = data.get("data_rows")
    if rows is None or not len(rows):
        return []
    return [Figure("realism.png", "Prior decodes over the data",
                   f"{len(dec)} decodes of fresh prior draws{_conditioned(p)} (orange) over {len(rows)} data rows "
                   f"(grey), projected on the data's two principal axes. The tests compare the decodes with {against}.",
                   F.projection(rows, dec))]


def _bijection_figures(s: dict[str, Any], data: dict[str, Any]) -> list[Figure]:
    out = []
    d = s.get("data") or {}
    if data.get("data_eigenvalues") is not None and d.get("available"):
        out.append(Figure("spectrum.png", "Data spectrum",
                          f"The data's covariance eigenvalues: {d['rank']} of {d['dims']} directions carry variance "
                          f"above the resolution floor ({num(d.get('variance_floor'), 2)}); the red ones are "
                          "degenerate (constant pixels, a removed mean), which no map can send onto all of the "
                          "latent space.", F.spectrum(data["data_eigenvalues"], float(d.get("variance_floor") or 0))))
    imgs = data.get("images") or {}
    if imgs.get("original") is not None and imgs.get("reconstructed") is not None and len(imgs["original"]):
        k = min(16, len(imgs["original"]))
        out.append(Figure("images_recon.png", "Originals and their round trips",
                          f"Top: {k} data samples x; below each: decode(encode(x)).",
                          F.image_pairs(imgs["original"][:k], imgs["reconstructed"][:k], ("original", "round trip"))))
    if data.get("recon_err") is not None and len(data["recon_err"]):
        enc = data.get("encode_err")
        out.append(Figure("round_trip.png", "Round-trip error", "Per sample: the largest |x' - x| over its values"
                          " after x -> z -> x'" + (", and the encode error against the exact latents (orange)"
                                                  if enc is not None else "") + ". " + ROUND_TRIP_NOTE.split(":")[0] + ".",
                          F.error_histogram(data["recon_err"], "round trip",
                                            ("encode", enc) if enc is not None else None)))
    return out


def _independence_figures(s: dict[str, Any], data: dict[str, Any]) -> list[Figure]:
    out = []
    ind = s.get("independence") or {}
    if data.get("corr") is not None:
        panels = [("latents: correlation", data["corr"]), ("latents: corr. of squares", data["corr_sq"])]
        cap = (f"Off-diagonal correlations of the {s.get('n_dims')} tested latent coordinates over "
               f"{s.get('n_samples')} rows")
        if data.get("ica_corr") is not None:
            panels += [("FastICA(data): correlation", data["ica_corr"]),
                       ("FastICA(data): corr. of squares", data["ica_corr_sq"])]
            rows = (s.get("ica") or {}).get("rows")
            thr = next((r["corr_threshold"] for r in (s.get("ica") or {}).get("table", [])
                        if r["representation"] == "FastICA(data)"), None)
            cap += (f", and of FastICA's components of the data ({rows} rows; their pass line "
                    f"{num(thr, 2)})")
        cap += (". One colour scale for all panels; the black lines on the colour bar mark the latents' pass line "
                "(each family at level alpha / 5, Bonferroni over pairs). Correlation of squares shows dependence that correlation "
                "misses (a shared scale).")
        out.append(Figure("dependence.png", "Dependence heatmaps", cap,
                          F.heatmaps(panels, ind.get("corr_threshold"))))
    if data.get("sample") is not None:
        nm = s.get("normality") or {}
        out.append(Figure("qq_summary.png", "Normality at a glance",
                          f"Every tested coordinate's QQ curve against N(0, 1), drawn as its deviation from the "
                          f"diagonal ({len(data['sample'])} seeded rows); {nm.get('n_dims_failing', 0)} of "
                          f"{s.get('n_dims')} coordinates are rejected by the normality tests (red).",
                          F.qq_summary(data["sample"], data.get("normality_fail"))))
    return out


def report_figures(s: dict[str, Any], data: dict[str, Any]) -> dict[str, list[Figure]]:
    """The figures of each question ("realism", "bijection", "independence") and of the details."""
    details = []
    if data.get("sample") is not None:
        details = [Figure("hist.png", "Per-coordinate histograms vs N(0, 1)", "The first 16 tested coordinates.",
                          F.per_dim_grid(data["sample"], "hist")),
                   Figure("qq.png", "Per-coordinate QQ plots vs N(0, 1)", "The first 16 tested coordinates.",
                          F.per_dim_grid(data["sample"], "qq"))]
    return {"realism": _realism_figures(s, data), "bijection": _bijection_figures(s, data),
            "independence": _independence_figures(s, data), "details": details}


def _numbers(key: str, s: dict[str, Any]) -> list[tuple[str, str]]:
    """The figures printed under a question's plot: (what, value)."""
    if key == "realism":
        p = s.get("prior") or {}
        if p.get("skipped") or not p:
            return [("not run", str(p.get("skipped", "--prior 0")))]
        cond = [("decodes conditioned on", str(p["conditioned_on"]))] if p.get("conditioned_on") else []
        return [("decodes / compared with", f"{p.get('m')} / {p.get('n_heldout')} {p.get('compared_with')}"), *cond,
                ("MMD² (RBF)", f"{num(p.get('mmd'))}, p {num(p.get('mmd_p'), 2)}"),
                ("classifier two-sample test", f"accuracy {num(p.get('c2st_accuracy'))}, p {num(p.get('c2st_p'), 2)}"
                 if p.get("c2st_accuracy") is not None else str(p.get("c2st_classifier"))),
                ("nearest-training distance ratio", f"{num(p.get('nn_distance_ratio'))} (1: as far as new data; "
                 "<< 1: copies)")]
    if key == "bijection":
        d, rec, st = s.get("data") or {}, s.get("reconstruction") or {}, s.get("stability") or {}
        rows = []
        if d.get("available"):
            rows.append(("data rank", f"{d['rank']} of {d['dims']} ({d['n_degenerate']} degenerate)"))
        if rec.get("max_abs_error") is not None:
            q = rec.get("max_abs_error_quantiles") or {}
            rows.append(("round-trip max |error|", f"{num(rec['max_abs_error'], 2)} (p50 {num(q.get('p50'), 2)}, "
                         f"p99 {num(q.get('p99'), 2)}; {rec.get('n_checked')} samples)"))
            if rec.get("fraction_requantised_exact") is not None:
                rows.append(("re-quantise exactly", f"{rec['fraction_requantised_exact']:.1%}"))
            if rec.get("encode_max_abs_error") is not None:
                rows.append(("encode max |error| vs exact latents", num(rec["encode_max_abs_error"], 2)))
        else:
            rows.append(("round trip", "not checked (--reconstruct N)"))
        if st.get("p99") is not None:
            rows.append(("latent drift p99 vs 10x tighter", f"{num(st['p99'], 2)} (target {num(st.get('target'), 2)})"))
        return rows
    ind, nm = s.get("independence") or {}, s.get("normality") or {}
    rows = [("Gaussian total correlation", f"{num(ind.get('gaussian_total_correlation'))} nats "
             f"(null mean {num(ind.get('gaussian_total_correlation_null_mean'), 2)})"),
            ("max |corr| / of squares", f"{num(ind.get('max_abs_offdiag_corr'), 2)} / "
             f"{num(ind.get('max_abs_offdiag_corr_of_squares'), 2)} (pass line {num(ind.get('corr_threshold'), 2)})"),
            ("coordinates not Gaussian", f"{nm.get('n_dims_failing')} of {s.get('n_dims')}")]
    comp = ((s.get("answers") or {}).get("independence") or {}).get("comparison") or []
    for r in comp:  # total dependence left, on the ICA comparison's rows
        if isinstance(r, dict) and r.get("total") is not None:
            ci = r.get("ci")
            rows.append((f"total dependence left: {r.get('representation')}", f"{num(r['total'])} nats"
                         + (f" [{num(ci[0])}, {num(ci[1])}]" if ci else "")))
    for r in (s.get("ica") or {}).get("table", []) if not comp else []:
        if r["representation"] == "FastICA(data)":
            rows.append(("FastICA: max |corr of squares|, |excess kurtosis|",
                         f"{num(r['max_abs_corr_of_squares'], 2)}, {num(r['mean_abs_excess_kurtosis'], 2)}"))
    return rows


# ---- detail sections -----

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


# ---- the Markdown: answers first, then the details ------------------------------------------------

def _answer_markdown(i: int, key: str, title: str, s: dict[str, Any], figs: list[Figure]) -> list[str]:
    a = (s.get("answers") or {}).get(key)
    d = deciding_number(key, a, s)
    head = f"**{verdict_kind(a).upper()}**" + (f" — **{d[0]}** {d[1]}" if d else "")
    facts = answer_facts(a)
    blocks = [f"## {i}. {title}", head + ("  \n" + "; ".join(f"{k}: {v}" for k, v in facts) if facts else "")]
    if a:
        blocks.append(_sentence(a["answer"]))
    blocks += [f"![{f.title}]({f.name})\n\n*{f.caption}*" for f in figs]
    blocks.append(_table(["figure", "value"], [list(r) for r in _numbers(key, s)]))
    if a:
        blocks.append(f"*What would change it:* {_sentence(a['would_change'])}")
    return blocks


def _detail_blocks(s: dict[str, Any], figs: list[Figure]) -> list[str]:
    """The details as Markdown blocks, one section per '## ' heading."""
    nm, ind = s["normality"], s["independence"]
    target = (s.get("prior_target") or {}).get("target", "N(0, I)")
    blocks = ["## All key figures", _key_table(s), f"**Verdict:** {s.get('verdict', '')}",
              "## Notes", "\n".join([
                  f"- Target: {target}. Latents are divided by the SDE's prior std ({num(s.get('prior_std'))}) and "
                  "standardised by p_T's mean and covariance where the data could be read.",
                  f"- Each answer is one decision at level {s['alpha']}: the five dependence families (Bonferroni over "
                  f"pairs) are each tested at {s['alpha']}/5, Bonferroni across families, so on exactly independent "
                  "latents the verdict says \"dependent\" at most that often; prior decodes: MMD and the classifier "
                  "test, Bonferroni over the two. Normality: Bonferroni over coordinates and the 6 tests; the "
                  "correlation of squares and distance correlation are descriptive (not in the verdict).",
                  f"- HSIC and binned MI use {ind['pair_test_dims']} coordinates; distance correlation uses a seeded "
                  "subsample of rows and pairs (the flagged ones first)."]),
              *_data_blocks(s), "## Normality",
              _table([f"test (alone, level alpha/(6D) = {num(nm.get('per_test_level'), 2)})", "dims failing"],
                     [[k, v] for k, v in nm["n_dims_failing_by_test"].items()]),
              f"Failing dims: {_fmt(nm['failing_dims'])}. Max KS {num(nm['max_ks'])} (5%: "
              f"{num(nm['ks_threshold_5pct'])}), max AD {num(nm['max_ad'])} (5%: 2.49).",
              *[f"![{f.title}]({f.name})\n\n*{f.title}: {f.caption}*" for f in figs],
              "## Distance correlation (subsample)",
              _table(["pair", "dCor", "p", "rejected"], [[t["pair"], t["dcor"], t["p"], t["rejected"]]
                                                         for t in ind["dcor_tests"]]) if ind["dcor_tests"]
              else "No pair tested."]
    blocks += _prior_blocks(s)
    rec = s.get("reconstruction")
    if rec and rec.get("max_abs_error") is not None:
        blocks += ["## Reconstruction", ROUND_TRIP_NOTE,
                   _table(["figure", "value"], [[k.replace("_", " "), v] for k, v in rec.items()
                                                if not isinstance(v, (dict, list))]),
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
    return blocks


def _title_block(s: dict[str, Any]) -> str:
    return (f"# pflatents analysis\n\nStore `{s.get('store')}`: {s.get('n_samples')} samples, {s.get('n_dims')} "
            f"coordinates tested ({s.get('rows_note', '')}); level alpha {num(s.get('alpha'))}.")


def report_markdown(s: dict[str, Any], figs: dict[str, list[Figure]]) -> str:
    """The Markdown twin: the three answers with their figures (PNG files beside it), then the details."""
    blocks = [_title_block(s)]
    for i, (key, title) in enumerate(QUESTIONS, 1):
        blocks += _answer_markdown(i, key, title, s, figs.get(key, []))
    blocks += ["---", *_detail_blocks(s, figs.get("details", []))]
    return "\n\n".join(blocks) + "\n"


# ---- the HTML page -----------------------------------------------------------------------------

def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _md_html(md: str) -> str:
    """CommonMark plus tables (raw HTML off); tables wrapped so that a wide one scrolls, never cuts."""
    from markdown_it import MarkdownIt

    out = MarkdownIt("commonmark", {"html": False}).enable("table").render(md)
    return out.replace("<table>", '<div class="tw"><table>').replace("</table>", "</table></div>")


def markdown_to_html(md: str, title: str = "pflatents analysis") -> str:
    """Any Markdown as a standalone page with the report's styles."""
    from pflatents.tasks.analysis.report_page import page

    return page(title, _md_html(md))


def _answer_html(i: int, key: str, title: str, s: dict[str, Any], figs: list[Figure]) -> str:
    e = html.escape
    a = (s.get("answers") or {}).get(key)
    kind = verdict_kind(a)
    d = deciding_number(key, a, s)
    facts = "".join(f"<li><b>{e(k)}</b> {e(v)}</li>" for k, v in answer_facts(a))
    text = [f'<h2><span class="qn">{i}</span>{e(title)}</h2>',
            f'<p class="verdict"><span class="badge">{e(kind)}</span></p>']
    if d:
        text.append(f'<p class="decide"><span class="value">{e(d[0])}</span><span class="what">{e(d[1])}</span></p>')
    eff = (a or {}).get("effect")
    if isinstance(eff, dict) and eff.get("value") is not None:
        ci = eff.get("ci")
        unit = "" if eff.get("unit") in _PLAIN_UNITS or eff.get("unit") is None else f" {eff['unit']}"
        text.append(f'<p class="effect"><span class="evalue">{e(num(eff["value"]) + unit)}</span>'
                    + (f' <span class="eci">{e(num(eff.get("ci_level", 0.95) * 100, 2))}% CI {e(num(ci[0]))} to '
                       f'{e(num(ci[1]))}</span>' if ci else "") + f'<span class="what">effect: {e(eff.get("name", ""))}</span></p>')
        facts = "".join(f"<li><b>{e(k)}</b> {e(v)}</li>" for k, v in answer_facts(a) if k not in ("effect", "level"))
    if facts:
        text.append(f'<ul class="facts">{facts}</ul>')
    if a:
        text += [f'<p class="answer">{e(_sentence(a["answer"]))}</p>',
                 f'<p class="change"><b>What would change it:</b> {e(_sentence(a["would_change"]))}</p>']
    pics = "".join(f'<figure class="fig" data-figure="{e(f.name[:-4])}"><img src="{_data_uri(f.png)}" '
                   f'alt="{e(f.title)}"><figcaption><b>{e(f.title)}.</b> {e(f.caption)}</figcaption></figure>'
                   for f in figs) or '<p class="nofig">No figure: nothing was computed for this question.</p>'
    nums = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _numbers(key, s))
    slug = kind.replace(" ", "-")
    return (f'<section class="q {slug}" id="{key}" data-verdict="{e(kind)}"><div class="qtext">{"".join(text)}</div>'
            f'<div class="qfig">{pics}<table class="nums">{nums}</table></div></section>')


def _details_html(blocks: list[str], figs: list[Figure]) -> str:
    """The detail sections, each a collapsible <details>; figure file names become embedded images."""
    sections: list[tuple[str, list[str]]] = []
    for b in blocks:
        if b.startswith("## "):
            sections.append((b[3:].strip(), []))
        elif sections:
            sections[-1][1].append(b)
    body = []
    for title, parts in sections:
        inner = _md_html("\n\n".join(parts))
        for f in figs:
            inner = inner.replace(f'src="{f.name}"', f'src="{_data_uri(f.png)}"')
        body.append(f"<details><summary>{html.escape(title)}</summary>{inner}</details>")
    return "".join(body)


def report_html(s: dict[str, Any], figs: dict[str, list[Figure]]) -> str:
    """The self-contained page: header, the three answers with their figures, the details."""
    from pflatents.tasks.analysis.report_page import page

    e = html.escape
    head = (f'<header><h1>pflatents analysis</h1><p class="meta">Store <code>{e(str(s.get("store")))}</code> · '
            f'{e(str(s.get("n_samples")))} samples · {e(str(s.get("n_dims")))} coordinates tested · '
            f'{e(str(s.get("rows_note", "")))} · level alpha {e(num(s.get("alpha")))}</p>'
            f'<p class="overall">{e(str(s.get("verdict", "")))}</p></header>')
    answers = "".join(_answer_html(i, key, title, s, figs.get(key, [])) for i, (key, title) in enumerate(QUESTIONS, 1))
    details = _details_html(_detail_blocks(s, figs.get("details", [])), figs.get("details", []))
    return page("pflatents analysis", head + f'<div class="answers">{answers}</div>'
                f'<h2 class="dh">Details</h2><div class="details">{details}</div>')


def write_report(directory: str | Path, summary: dict[str, Any], data: dict[str, Any]) -> dict[str, str]:
    """Write report.html (self-contained), report.md and its PNGs into ``directory``; returns the paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    figs = report_figures(summary, data)
    for f in (f for group in figs.values() for f in group):
        (out / f.name).write_bytes(f.png)
    (out / "report.md").write_text(report_markdown(summary, figs))
    (out / "report.html").write_text(report_html(summary, figs))
    return {"markdown": str(out / "report.md"), "html": str(out / "report.html")}
