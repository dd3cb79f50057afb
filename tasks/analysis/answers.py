"""The three answers that open the report and the JSON: realism, bijection, independence vs ICA.

Each answer is a short verdict, the numbers it rests on, and what would change it. They are built
only from the summary's own figures (no new computation). Pure Python.
"""

from __future__ import annotations

from typing import Any

__all__ = ["answers", "ica_sentence"]


def _g(v: Any, fmt: str = ".3g") -> str:
    return "n/a" if v is None else format(v, fmt)


def _realism(s: dict[str, Any]) -> dict[str, Any]:
    p = s.get("prior") or {}
    if not p or p.get("skipped"):
        return {"answer": "not checked", "numbers": {}, "why": p.get("skipped", "--prior 0"),
                "would_change": "run analyze with --prior M (M decodes of fresh prior draws) and a loadable model"}
    nums = {k: p.get(k) for k in ("mmd", "mmd_p", "c2st_accuracy", "c2st_p", "nn_distance_ratio", "m")}
    ratio = p.get("nn_distance_ratio")
    copies = ratio is not None and ratio < 0.5
    if p.get("distinguishable"):
        verdict = (f"no: decodes of {p['m']} prior draws are told apart from {p['compared_with']} "
                   f"(classifier accuracy {_g(p['c2st_accuracy'], '.2f')}, 0.5 = indistinguishable, p {_g(p['c2st_p'], '.2g')}; "
                   f"MMD {_g(p['mmd'])}, p {_g(p['mmd_p'], '.2g')})")
        change = ("more training or a larger model; the decodes are kept in the analysis group (prior_decodes) "
                  "and shown in the report's image grid for images")
    else:
        verdict = (f"yes, as far as {p['m']} draws can tell: decodes are not told apart from {p['compared_with']} "
                   f"(classifier accuracy {_g(p['c2st_accuracy'], '.2f')}, MMD p {_g(p['mmd_p'], '.2g')})")
        change = "more draws (--prior M) detect smaller differences; a test against held-out rows needs train --holdout"
    far = ratio is not None and ratio > 1.5
    verdict += (f"; nearest-training-sample distance ratio {_g(ratio, '.2f')} "
                + ("(well below 1: the model reproduces training samples)" if copies else
                   "(well above 1: decodes lie farther from the data than new samples do)" if far else
                   "(1 = as far as new data)"))
    if copies:
        change = "the model memorises: more data, fewer training steps, or a smaller model"
    return {"answer": verdict, "numbers": nums, "would_change": change}


def _dims(dims: list[int], k: int = 8) -> str:
    return "dims " + ", ".join(str(d) for d in dims[:k]) + (", ..." if len(dims) > k else "")


def _bijection(s: dict[str, Any]) -> dict[str, Any]:
    data, rec = s.get("data") or {}, s.get("reconstruction") or {}
    parts, nums = [], {}
    change = []
    if data.get("available"):
        nums.update(rank=data["rank"], dims=data["dims"], n_degenerate=data["n_degenerate"])
        if data["n_degenerate"]:
            deg = (s.get("latent") or {}).get("degenerate_part") or []
            axis = [d for d in deg if d["direction"].startswith("dim ")]
            other = [d for d in deg if not d["direction"].startswith("dim ")]
            along = []
            if axis:
                along.append(f"{data['n_constant_dims']} (nearly) constant dims ({_dims(data['constant_dims'])}), "
                             f"where the latents have variance {min(d['latent_variance'] for d in axis):.2g} to "
                             f"{max(d['latent_variance'] for d in axis):.2g} instead of {axis[0]['prior_variance']:.2g}")
            along += [f"along {d['direction']} the latents have variance {d['latent_variance']:.2g} instead of "
                      f"{d['prior_variance']:.2g}" for d in other[:3]]
            parts.append(f"no, not onto R^{data['dims']}: the data span {data['rank']} of {data['dims']} dims "
                         f"({'; '.join(along)})")
            change.append("nothing in the model can: those directions carry no data (or less than the data's "
                          "resolution); train and analyse on the "
                          f"{data['rank']} spanned coordinates, or read the latents' degenerate part as constant")
        else:
            parts.append(f"the data span all {data['dims']} dims")
    else:
        parts.append(f"the data's rank is unknown ({data.get('reason') or 'data not read'})")
    if rec.get("max_abs_error") is not None:
        nums.update(round_trip_max_abs_error=rec["max_abs_error"], n_checked=rec.get("n_checked"))
        text = f"round trip x -> z -> x' max abs error {rec['max_abs_error']:.2g} on {rec.get('n_checked')} samples"
        if rec.get("fraction_requantised_exact") is not None:
            text += f" ({rec['fraction_requantised_exact']:.1%} re-quantise exactly)"
        parts.append(text)
        change.append("a tighter solver tolerance lowers the round-trip error")
    else:
        parts.append("the round trip was not checked (--reconstruct N)")
    st = s.get("stability") or {}
    if st.get("p99") is not None:
        nums.update(stability_p99_drift=st["p99"], stability_target=st.get("target"))
        parts.append(f"re-encoding {st.get('n')} samples 10x more accurately moves the latents by {st['p99']:.2g} "
                     f"(p99; target {st.get('target'):g}: {'met' if st.get('meets_target') else 'missed'})")
        if not st.get("meets_target"):
            change.append("a tighter extraction tolerance (the stored latents are less accurate than the target)")
    answer = "; ".join(parts)
    if not (data.get("available") and data["n_degenerate"]):
        answer = ("yes, on the rows checked: " if rec.get("max_abs_error") is not None else "") + answer
    return {"answer": answer, "numbers": nums, "would_change": "; ".join(change) or "--reconstruct N checks the round trip"}


def ica_sentence(table: list[dict[str, Any]]) -> str:
    """What the ICA table shows, in words: which representation has the weaker nonlinear dependence,
    which is Gaussian, and (with known sources) which recovers them."""
    rows = {r["representation"]: r for r in table}
    lat, ica = rows.get("PF-ODE latents"), rows.get("FastICA(data)")
    if not lat or not ica:
        return ""
    a, b, thr = lat["max_abs_corr_of_squares"], ica["max_abs_corr_of_squares"], lat["corr_threshold"]
    figs = f"max |corr of squares| {a:.3g} for the latents, {b:.3g} for FastICA; pass line {thr:.3g}"
    if a < thr and b < thr:
        text = f"Neither representation shows nonlinear dependence above the pass line ({figs})."
    else:
        weaker = "The PF-ODE latents" if a < b else "The FastICA components"
        text = f"{weaker} have the weaker nonlinear dependence ({figs})."
    rej = lambda r: ", ".join(r["dependence_tests_rejecting"]) or "none"  # noqa: E731
    text += f" Dependence tests rejecting: latents {rej(lat)}; FastICA {rej(ica)}."
    gauss = lambda r: r["mean_abs_excess_kurtosis"] < r["kurtosis_threshold"]  # noqa: E731
    text += (f" Mean |excess kurtosis| {lat['mean_abs_excess_kurtosis']:.3g} (latents) and "
             f"{ica['mean_abs_excess_kurtosis']:.3g} (FastICA), pass line {lat['kurtosis_threshold']:.3g}: the latents "
             f"{'are' if gauss(lat) else 'are not'} Gaussian-like, FastICA's components "
             f"{'are too (the data show no non-Gaussian sources for ICA to find)' if gauss(ica) else 'are not (ICA found non-Gaussian sources)'}.")
    if lat.get("amari_distance") is not None and ica.get("amari_distance") is not None:
        text += (f" Against the known sources the Amari distance is {ica['amari_distance']:.2g} for FastICA and "
                 f"{lat['amari_distance']:.2g} for the latents (0 = the sources up to order and scale).")
    return text


def _independence(s: dict[str, Any]) -> dict[str, Any]:
    from pflatents.tasks.analysis.summary import independence_failures

    ind, nm = s["independence"], s["normality"]
    bad = independence_failures(ind)
    coords = (s.get("prior_target") or {}).get("coordinates") or "the latent dims"
    target = "p_T" if (s.get("prior_target") or {}).get("target", "").startswith("p_T") else "N(0, I)"
    nums = {"gaussian_total_correlation": ind["gaussian_total_correlation"],
            "gaussian_total_correlation_null_mean": ind["gaussian_total_correlation_null_mean"],
            "max_abs_offdiag_corr": ind["max_abs_offdiag_corr"], "corr_threshold": ind["corr_threshold"],
            "n_dims_failing_normality": nm["n_dims_failing"], "tests_rejecting": bad}
    head = ("yes: no dependence test rejects" if not bad else f"no: {', '.join(bad)} reject")
    answer = (f"{head} on {coords} (target {target}; Gaussian total correlation "
              f"{ind['gaussian_total_correlation']:.3g}, null mean {ind['gaussian_total_correlation_null_mean']:.2g}); "
              f"{nm['n_dims_failing']} of {s['n_dims']} coordinates are not Gaussian")
    sp = s.get("splits") or {}
    if sp.get("known"):
        t, h = sp["train"], sp["heldout"]
        answer += (f"; training vs held-out rows ({t['n']} vs {h['n']}): {t['n_dims_failing']} vs {h['n_dims_failing']} "
                   f"coordinates not Gaussian, total correlation {t['gaussian_total_correlation']:.3g} (null "
                   f"{t['gaussian_total_correlation_null_mean']:.2g}) vs {h['gaussian_total_correlation']:.3g} (null "
                   f"{h['gaussian_total_correlation_null_mean']:.2g})")
    ica = s.get("ica")
    if ica:
        answer += ". ICA: " + ica_sentence(ica["table"]).rstrip(".")
        change = ("independence in every rotation does not identify sources: only ICA's components can be "
                  "the sources; a better model lowers the latents' dependence")
    else:
        change = "run with --ica to compare with FastICA on the same rows"
    if bad:
        change = f"more training or a better model; at N = {s['n_samples']} the correlation pass line is " \
                 f"{ind['corr_threshold']:.2g}, and more samples detect weaker dependence; " + change
    return {"answer": answer, "numbers": nums, "would_change": change}


def answers(s: dict[str, Any]) -> dict[str, Any]:
    """{"realism", "bijection", "independence"}: each {"answer", "numbers", "would_change"}."""
    return {"realism": _realism(s), "bijection": _bijection(s), "independence": _independence(s)}
