"""The three answers that open the report and the JSON: realism, bijection, independence vs ICA.

Each answer is one decision at the stated level ``alpha`` (``--alpha``; docs/statistics.md, "One
decision per question"), built only from the summary's own figures (no new data pass). Every answer
is a dict with these fields (the HTML and Markdown reports render them; the JSON carries them):

- ``answer`` (str): the verdict in words, starting with its kind ("yes", "no", "cannot tell", "not
  checked"), the effect and what it rests on;
- ``kind`` (str): ``"yes"``, ``"no"``, ``"cannot tell"`` (not enough rows or draws to say) or
  ``"not checked"`` (the check was not run);
- ``level`` (float | None): the false-alarm rate the decision is made at (``alpha``; None when no
  test decides, e.g. not checked);
- ``deciding`` (dict | None): the one number that decides it: ``name``, ``value`` (a combined
  p-value for a test, or a figure), ``threshold`` (reject when ``value`` < ``threshold``; None when
  the number decides by a rule, not a test), ``text`` (one line);
- ``effect`` (dict | None): how large the departure is: ``name``, ``value``, ``ci`` ([low, high] or
  None), ``ci_level`` (coverage, 1 - alpha), ``unit`` ("nats", "accuracy", "variance ratio", ...);
- ``mde`` (dict | None): the minimum detectable effect, in the effect's unit where possible: the
  size that this N would have detected with probability ``power`` (0.8) at ``level``: ``name``,
  ``value``, ``power``, ``unit``, ``text``;
- ``numbers`` (dict): the figures the verdict rests on; ``would_change`` (str): what would change it.

The independence answer also carries ``comparison`` when the ICA comparison ran: the total
dependence left (nats, with confidence intervals) in the raw data, FastICA's components and the
latents on the same rows, and ``replace_ica`` (str), the answer to "can it replace ICA?". Pure Python.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["answers", "ica_sentence", "ica_comparison", "decision_line"]


def _g(v: Any, fmt: str = ".3g") -> str:
    return "n/a" if v is None else format(v, fmt)


def _ci(ci: list[float] | tuple[float, float] | None, fmt: str = ".3g") -> str:
    return "" if ci is None else f" [{format(ci[0], fmt)}, {format(ci[1], fmt)}]"


def _fields(kind: str, level: float | None, deciding: dict | None = None, effect: dict | None = None,
            mde: dict | None = None) -> dict[str, Any]:
    """The decision fields every answer carries (see the module docstring)."""
    return {"kind": kind, "level": level, "deciding": deciding, "effect": effect, "mde": mde}


MAX_C2ST_MDE = 0.75  # a classifier this accurate would go unseen more than 1 time in 5: "cannot tell"


def _realism(s: dict[str, Any]) -> dict[str, Any]:
    from pflatents.tasks.analysis.decision import POWER, c2st_mde, clopper_pearson

    p = s.get("prior") or {}
    alpha = float(s.get("alpha", 0.05))
    if not p or p.get("skipped"):
        return {"answer": "not checked", "numbers": {}, "why": p.get("skipped", "--prior 0"),
                "would_change": "run analyze with --prior M (M decodes of fresh prior draws) and a loadable model",
                **_fields("not checked", None)}
    alpha = float(p.get("level", alpha))
    nums = {k: p.get(k) for k in ("mmd", "mmd_p", "c2st_accuracy", "c2st_p", "nn_distance_ratio", "m")}
    ratio = p.get("nn_distance_ratio")
    copies = ratio is not None and ratio < 0.5
    pval = p.get("p", p.get("mmd_p"))
    acc, n_c = p.get("c2st_accuracy"), p.get("c2st_n") or (p.get("n_decodes", 0) + p.get("n_heldout", 0))
    k_tests = 2 if p.get("c2st_p") is not None else 1
    effect = mde = None
    if acc is not None and n_c:
        effect = {"name": "classifier two-sample accuracy (0.5 = indistinguishable)", "value": acc,
                  "ci": list(clopper_pearson(int(round(acc * n_c)), n_c, 1 - alpha)), "ci_level": 1 - alpha,
                  "unit": "accuracy"}
        a_mde = c2st_mde(n_c, alpha / k_tests / max(int(p.get("c2st_n_classifiers", 2)), 1))
        mde = {"name": "classifier accuracy detected with 80 % probability", "value": a_mde, "power": POWER,
               "unit": "accuracy", "text": f"a classifier accuracy of {_g(a_mde, '.3f')} or more would have been "
               f"detected with {POWER:.0%} probability"}
    deciding = {"name": "p-value, MMD and classifier test combined (Bonferroni)", "value": pval, "threshold": alpha,
                "text": f"combined p {_g(pval, '.2g')} vs level {alpha:g}"}
    cannot = acc is None or mde is None or mde["value"] is None or mde["value"] > MAX_C2ST_MDE
    if p.get("distinguishable"):
        kind = "no"
        verdict = (f"no: decodes of {p['m']} prior draws are told apart from {p['compared_with']} at level {alpha:g} "
                   f"(classifier accuracy {_g(acc, '.2f')}{_ci(effect and effect['ci'], '.2f')}, 0.5 = indistinguishable; "
                   f"MMD {_g(p['mmd'])}, p {_g(p['mmd_p'], '.2g')}; combined p {_g(pval, '.2g')})")
        change = ("more training or a larger model; the decodes are kept in the analysis group (prior_decodes) "
                  "and shown in the report's image grid for images")
    elif cannot:
        kind = "cannot tell"
        verdict = (f"cannot tell: {p['m']} draws are too few to say (decodes not told apart from {p['compared_with']}, "
                   f"combined p {_g(pval, '.2g')}, but " + (mde["text"] if mde and mde["value"] is not None else
                                                             "the classifier test could not run") + ")")
        change = "more draws (--prior M)"
    else:
        kind = "yes"
        verdict = (f"yes, as far as {p['m']} draws can tell: decodes are not told apart from {p['compared_with']} "
                   f"at level {alpha:g} (classifier accuracy {_g(acc, '.2f')}{_ci(effect['ci'], '.2f')}, "
                   f"combined p {_g(pval, '.2g')}); {mde['text']}")
        change = "more draws (--prior M) detect smaller differences; a test against held-out rows needs train --holdout"
    far = ratio is not None and ratio > 1.5
    verdict += (f"; nearest-training-sample distance ratio {_g(ratio, '.2f')} "
                + ("(well below 1: the model reproduces training samples)" if copies else
                   "(well above 1: decodes lie farther from the data than new samples do)" if far else
                   "(1 = as far as new data)"))
    if p.get("conditioned_on"):  # a class-conditional model: which class each decode was drawn under
        verdict += f"; decodes conditioned on {p['conditioned_on']}"
    if copies:
        change = "the model memorises: more data, fewer training steps, or a smaller model"
    return {"answer": verdict, "numbers": nums, "would_change": change,
            **_fields(kind, alpha, deciding, effect, mde)}


def _dims(dims: list[int], k: int = 8) -> str:
    return "dims " + ", ".join(str(d) for d in dims[:k]) + (", ..." if len(dims) > k else "")


def _degenerate_test(s: dict[str, Any], alpha: float) -> tuple[dict | None, dict | None, dict | None, bool]:
    """The latents' variance along the degenerate data directions against the prior's: the most
    extreme direction's two-sided chi-square p (Bonferroni over directions), its variance ratio with
    an interval, and the shrink factor detected with 80 % probability. (deciding, effect, mde, rejected)"""
    from pflatents.tasks.analysis.decision import (POWER, variance_ratio_ci, variance_ratio_mde,
                                                   variance_ratio_p)

    deg = (s.get("latent") or {}).get("degenerate_part") or []
    n = int(s.get("n_samples") or 0)
    k = int((s.get("data") or {}).get("n_degenerate") or len(deg))
    if not deg or n < 2:
        return None, None, None, False
    ratios = [d["latent_variance"] / d["prior_variance"] if d["prior_variance"] > 0 else 0.0 for d in deg]
    worst = int(np.argmax([abs(np.log(max(r, 1e-300))) for r in ratios]))
    r = ratios[worst]
    p = min(1.0, k * variance_ratio_p(r, n))
    deciding = {"name": f"variance test along {deg[worst]['direction']} (chi-square, Bonferroni over {k} directions)",
                "value": p, "threshold": alpha, "text": f"p {p:.2g} vs level {alpha:g}"}
    effect = {"name": f"latent variance / prior variance along {deg[worst]['direction']}", "value": r,
              "ci": list(variance_ratio_ci(r, n, 1 - alpha)), "ci_level": 1 - alpha, "unit": "variance ratio"}
    shrink = variance_ratio_mde(n, alpha / k)
    mde = {"name": "variance shrink factor detected with 80 % probability", "value": shrink, "power": POWER,
           "unit": "variance ratio", "text": f"a latent variance of {_g(shrink, '.3g')} x the prior's or less along "
           f"a degenerate direction would have been detected with {POWER:.0%} probability"}
    return deciding, effect, mde, p < alpha


def _bijection(s: dict[str, Any]) -> dict[str, Any]:
    data, rec = s.get("data") or {}, s.get("reconstruction") or {}
    alpha = float(s.get("alpha", 0.05))
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
    degenerate = bool(data.get("available") and data["n_degenerate"])
    deciding, effect, mde, rejected = _degenerate_test(s, alpha) if degenerate else (None, None, None, False)
    if degenerate and (rejected or deciding is None):
        kind = "no"
        if effect:
            answer += (f" (at level {alpha:g}: latent/prior variance {effect['value']:.3g}{_ci(effect['ci'])}, "
                       f"{deciding['text']})")
    elif degenerate:
        kind = "cannot tell"
        answer = (f"cannot tell: the data are degenerate but the latents' variance along it is not told from the "
                  f"prior's at level {alpha:g} ({deciding['text']}; {mde['text']}); " + answer)
    else:
        kind = "yes" if data.get("available") else "cannot tell"
        if rec.get("max_abs_error") is not None:
            answer = "yes, on the rows checked: " + answer
        elif kind == "cannot tell":
            answer = "cannot tell: " + answer
        deciding = ({"name": "data rank (directions above the resolution floor)", "value": data["rank"],
                     "threshold": None, "text": f"rank {data['rank']} of {data['dims']}"} if data.get("available")
                    else None)
        if rec.get("max_abs_error") is not None:
            effect = {"name": "round-trip max abs error", "value": rec["max_abs_error"], "ci": None, "ci_level": None,
                      "unit": "data units"}
    if not answer.startswith(("yes", "no", "cannot tell")):
        answer = "yes: " + answer if kind == "yes" else answer
    return {"answer": answer, "numbers": nums,
            "would_change": "; ".join(change) or "--reconstruct N checks the round trip",
            **_fields(kind, alpha if deciding and deciding.get("threshold") is not None else None, deciding, effect, mde)}


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


def _independence_decision(s: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(kind, head of the answer, decision fields) of the independence question at level alpha."""
    from pflatents.tasks.analysis.decision import MAX_PAIR_MDE, POWER
    from pflatents.tasks.analysis.summary import decision_figures, independence_failures

    ind, n, d = s["independence"], int(s["n_samples"]), int(s["n_dims"])
    alpha = float(s.get("alpha", ind.get("level", 0.05)))
    if "p" not in ind:  # a summary made before the combined decision
        ind = {**ind, **decision_figures(ind, n, d, alpha)}
    bad = independence_failures(ind)
    td = ind.get("total_dependence")
    if td and td.get("total") is not None:
        effect = {"name": "total dependence left (Gaussian part + non-Gaussian part)", "value": td["total"],
                  "ci": td.get("total_ci"), "ci_level": 1 - alpha, "unit": "nats",
                  "parts": {"gaussian": td.get("gaussian"), "non_gaussian": td.get("non_gaussian"),
                            "rows": td.get("n")}}
    else:
        effect = {"name": "Gaussian total correlation (bias-corrected)", "value": ind["gaussian_total_correlation_estimate"],
                  "ci": ind.get("gaussian_total_correlation_ci"), "ci_level": 1 - alpha, "unit": "nats"}
    tc_mde, r_mde = ind.get("mde_gaussian_total_correlation"), ind.get("mde_pair_corr")
    mde = {"name": "Gaussian total correlation detected with 80 % probability", "value": tc_mde, "power": POWER,
           "unit": "nats", "pair_corr": r_mde, "pair_mutual_information": ind.get("mde_pair_mutual_information"),
           "text": f"a Gaussian total correlation of {_g(tc_mde)} nats or more, or one pair correlated at "
                   f"|r| >= {_g(r_mde)} (also in |z|), would have been detected with {POWER:.0%} probability"}
    deciding = {"name": "p-value, 5 dependence families combined (Bonferroni)", "value": ind["p"], "threshold": alpha,
                "text": f"combined p {ind['p']:.2g} vs level {alpha:g}"}
    eff = f"{effect['value']:.3g} nats{_ci(effect['ci'])}"
    if d < 2:
        kind, head = "yes", "yes: a single coordinate has nothing to depend on"
        deciding, mde = None, None
    elif bad:
        kind, head = "no", (f"no: dependent at level {alpha:g} ({', '.join(bad)} reject; combined p {ind['p']:.2g}); "
                            f"{effect['name']} {eff}")
    elif r_mde is None or r_mde > MAX_PAIR_MDE or tc_mde is None:
        kind, head = "cannot tell", (f"cannot tell: not enough rows to say (N = {n} for {d} coordinates; nothing "
                                     f"rejects, combined p {ind['p']:.2g}, but only a pairwise correlation of "
                                     f"|r| >= {_g(r_mde)} would be detected with {POWER:.0%} probability)")
    else:
        kind, head = "yes", (f"yes: no dependence detected at N = {n} (level {alpha:g}, combined p {ind['p']:.2g}); "
                             f"{mde['text']}; {effect['name']} {eff}")
    return kind, head, _fields(kind, alpha if deciding else None, deciding, effect, mde)


def _independence(s: dict[str, Any]) -> dict[str, Any]:
    from pflatents.tasks.analysis.summary import independence_failures

    ind, nm = s["independence"], s["normality"]
    kind, head, fields = _independence_decision(s)
    coords = (s.get("prior_target") or {}).get("coordinates") or "the latent dims"
    target = "p_T" if (s.get("prior_target") or {}).get("target", "").startswith("p_T") else "N(0, I)"
    nums = {"gaussian_total_correlation": ind["gaussian_total_correlation"],
            "gaussian_total_correlation_null_mean": ind["gaussian_total_correlation_null_mean"],
            "max_abs_offdiag_corr": ind["max_abs_offdiag_corr"], "corr_threshold": ind["corr_threshold"],
            "n_dims_failing_normality": nm["n_dims_failing"], "tests_rejecting": independence_failures(ind)}
    answer = (f"{head}; on {coords} (target {target}); {nm['n_dims_failing']} of {s['n_dims']} coordinates are "
              "not Gaussian")
    sp = s.get("splits") or {}
    if sp.get("known"):
        t, h = sp["train"], sp["heldout"]
        answer += (f"; training vs held-out rows ({t['n']} vs {h['n']}): {t['n_dims_failing']} vs {h['n_dims_failing']} "
                   f"coordinates not Gaussian, total correlation {t['gaussian_total_correlation']:.3g} (null "
                   f"{t['gaussian_total_correlation_null_mean']:.2g}) vs {h['gaussian_total_correlation']:.3g} (null "
                   f"{h['gaussian_total_correlation_null_mean']:.2g})")
    ica = s.get("ica")
    out: dict[str, Any] = {}
    if ica:
        answer += ". ICA: " + ica_sentence(ica["table"]).rstrip(".")
        change = ("independence in every rotation does not identify sources: only ICA's components can be "
                  "the sources; a better model lowers the latents' dependence")
        comp = ica_comparison(ica["table"], fields["level"] or float(s.get("alpha", 0.05)))
        if comp:
            out = {"comparison": comp["rows"], "replace_ica": comp["text"]}
            answer += ". Can it replace ICA? " + comp["text"].rstrip(".")
    else:
        change = "run with --ica to compare with FastICA on the same rows"
    if kind == "no":
        change = f"more training or a better model; at N = {s['n_samples']} the correlation pass line is " \
                 f"{ind['corr_threshold']:.2g}, and more samples detect weaker dependence; " + change
    elif kind == "cannot tell":
        change = "more rows: the minimum detectable effect shrinks like 1/sqrt(N); " + change
    return {"answer": answer, "numbers": nums, "would_change": change, **fields, **out}


def ica_comparison(table: list[dict[str, Any]], alpha: float) -> dict[str, Any] | None:
    """The total dependence left by each representation (nats, with intervals) and which leaves less:
    the answer to "can the map replace ICA?" (None without the estimates in the table)."""
    rows = {r["representation"]: r for r in table}
    lat, ica = rows.get("PF-ODE latents"), rows.get("FastICA(data)")
    if not lat or not ica or (lat.get("total_dependence") or {}).get("total") is None \
            or (ica.get("total_dependence") or {}).get("total") is None:
        return None
    out = []
    for r in table:
        td = r.get("total_dependence") or {}
        if td.get("total") is not None:
            out.append({"representation": r["representation"], "total": td["total"], "ci": td.get("total_ci"),
                        "gaussian": td.get("gaussian"), "non_gaussian": td.get("non_gaussian"), "n": td.get("n")})
    a, b = lat["total_dependence"], ica["total_dependence"]
    figs = (f"total dependence left {a['total']:.3g}{_ci(a.get('total_ci'))} nats in the latents, "
            f"{b['total']:.3g}{_ci(b.get('total_ci'))} in FastICA's components")
    raw = rows.get("raw data", {}).get("total_dependence") or {}
    if raw.get("total") is not None:
        figs += f", {raw['total']:.3g}{_ci(raw.get('total_ci'))} in the raw data"
    diff = (lat.get("total_dependence_difference_vs") or {}).get("FastICA(data)")
    if diff is None:
        lo = a["total_ci"][0] - b["total_ci"][1] if a.get("total_ci") and b.get("total_ci") else None
        hi = a["total_ci"][1] - b["total_ci"][0] if a.get("total_ci") and b.get("total_ci") else None
        diff = {"value": a["total"] - b["total"], "ci": None if lo is None else [lo, hi]}
    d, ci = diff["value"], diff.get("ci")
    if ci is not None and ci[0] > 0:
        text = (f"no: FastICA's components leave less dependence than the latents, by {d:.3g} nats{_ci(ci)} "
                f"({figs}; {1 - alpha:.0%} intervals)")
    elif ci is not None and ci[1] < 0:
        text = (f"as an independence transform, yes: the latents leave less dependence than FastICA's components, by "
                f"{-d:.3g} nats{_ci([-ci[1], -ci[0]])} ({figs}; {1 - alpha:.0%} intervals); they do not recover "
                "sources (see the Amari distances)")
    else:
        text = (f"about as well: the two leave the same dependence within the intervals (difference latents - FastICA "
                f"{d:.3g} nats{_ci(ci)}; {figs})")
    return {"rows": out, "text": text, "difference": {"value": d, "ci": ci}}


def decision_line(a: dict[str, Any]) -> str:
    """One compact line beside a verdict: its kind and level, the deciding number, the effect with its
    interval and the minimum detectable effect (empty for an answer without these fields)."""
    if "kind" not in a:
        return ""
    unit = lambda u: "" if u in ("accuracy", "variance ratio", "data units") else f" {u}"  # noqa: E731
    parts = [f"{a['kind']}" + (f" at level {a['level']:g}" if a.get("level") is not None else "")]
    if a.get("deciding"):
        parts.append(a["deciding"]["text"])
    e = a.get("effect")
    if e and e.get("value") is not None:
        ci = e.get("ci")
        parts.append(f"effect {e['value']:.3g}{unit(e['unit'])}"
                     + (f" ({e['ci_level']:.0%} CI {ci[0]:.3g} to {ci[1]:.3g})" if ci else "") + f" ({e['name']})")
    m = a.get("mde")
    if m and m.get("value") is not None:
        parts.append(f"minimum detectable effect {m['value']:.3g}{unit(m['unit'])} ({m['power']:.0%} power)")
    return "; ".join(parts)


def answers(s: dict[str, Any]) -> dict[str, Any]:
    """{"realism", "bijection", "independence"}: each {"answer", "numbers", "would_change"}."""
    return {"realism": _realism(s), "bijection": _bijection(s), "independence": _independence(s)}
