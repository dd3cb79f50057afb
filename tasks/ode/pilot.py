"""Pilot measurements before an extraction: the right-hand side's noise floor, and the cheapest
solver setting that meets a per-sample latent error target (``--latent-tol E``).

- ``rhs_noise``: how noisy the PF-ODE's right-hand side is at the working precision, measured as
  ``RMS|F_lo - F_hi| / RMS|F_hi|`` per sample on states ``x_t = alpha(t) x0 + sigma(t) eps`` of a pilot
  batch (the ODE's marginals at t), where F_lo is the model and state at the working dtype and F_hi the
  same in float64 (a float64 twin of the network, or the exact score evaluated in float64). The
  solver's controller uses it as a floor (``Control.noise``), so a tolerance below what a float32
  network can deliver costs no extra steps.
- ``search``: the pilot. Two disjoint seeded subsets of the data (``fit`` and ``held``, 128 samples
  each) are encoded by a float64 reference run (the float64 model, dopri5 at a tolerance far below E).
  Every solver of the product is a *family* of settings ordered by accuracy (``families``): each
  fixed-step solver on each time grid, its step count on a ladder of ~12 % increments; each adaptive
  solver with its tolerance on a ladder of quarter decades (with and without the noise floor). On the
  fit set, each family is searched for its cheapest rung whose per-sample p99 error is at most
  ``E / MARGIN`` (up the ladder by gallops or to where its last two rungs extrapolate, then bisection;
  a family stops once it costs, or is extrapolated to cost, more NFE than the best found), the best family is refined between its last two rungs by bisection (steps to
  +-1, tolerances to 1/32 decade), and the choice is confirmed on the held-out set: if its held-out
  p99 exceeds E it steps to the next more accurate rung of its family, and says so. Every setting
  measured is kept (``curve``), with the held-out figures of each family's best.

Pure torch, no Prefect or storage: the extract flow runs it as a task (tasks/wrappers/pilot.py), which
pins what it returns in the store before any shard runs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from pflatents.tasks.core import Model as ScoreModel, cond_tensor
from pflatents.tasks.errors import SolverError
from pflatents.tasks.ode.noise import rhs_noise_curve
from pflatents.tasks.ode.pfode import EPS_SOLVERS, GRIDS, SOLVERS, SolverConfig, encode
from pflatents.tasks.ode.sde import SDE

__all__ = ["rhs_noise", "Family", "families", "search", "PilotResult", "reference_config", "pilot_subsets",
           "setting_text",
           "latent_pilot", "pending", "pending_record", "describe", "curve_table", "MARGIN", "PILOT_N", "PILOT_SEED"]

F64 = torch.float64
# the choice's p99 on the fit set is at most E / MARGIN: room for the p99 of 128 other samples (the
# held-out set, and the data) to come out higher than the fit set's; the held-out check catches the rest
MARGIN = 2.0
PILOT_N, PILOT_SEED = 128, 0
STEP_RATIO = 1.125  # the fixed-step ladder: ~12 % more steps a rung (rk4: error ~1.6x a rung)
QUARTER = 0.25  # the tolerance ladder: quarter decades (error ~1.5-1.8x a rung)
MAX_STEPS, MAX_TOL_EXP = 4096, 10.0  # the ladders end at 4096 steps and tolerance 1e-10
MAX_STEP_UPS = 8  # held-out check: at most this many rungs up


def rhs_noise(model: ScoreModel, model_hi: ScoreModel, sde: SDE, x0: torch.Tensor, t_eps: float,
              dtype: torch.dtype = torch.float32, n_t: int = 12, seed: int = 0, quantile: float = 0.9,
              cond=None, ddim: bool = False) -> float:
    """Relative noise of the right-hand side at ``dtype`` against float64 (see the module docstring):
    the largest over ``n_t`` log-spaced times of the ``quantile`` over samples (``rhs_noise_curve``);
    of the DDIM form's eps_hat with ``ddim``. 0 for a float64 working dtype (the reference itself)."""
    curve = rhs_noise_curve(model, model_hi, sde, x0, t_eps, dtype, n_t, seed, quantile, ddim=ddim, cond=cond)
    return max((level for _, level in curve), default=0.0)


# ---- the ladders --------------------------------------------------------------------------------

def _step_ladder() -> list[int]:
    out = [1]
    while out[-1] < MAX_STEPS:
        out.append(max(out[-1] + 1, round(out[-1] * STEP_RATIO)))
    return out


STEP_LADDER = _step_ladder()  # 1, 2, ..., 8, 9, 10, 11, 12, 14, 16, 18, 20, 22, 25, 28, 32, 36, 40, ...


@dataclass(frozen=True)
class Family:
    """Settings of one solver (and grid, or noise floor) ordered by accuracy: rung ``k`` is
    ``at(param(k))``. The parameter is the step count (fixed-step) or q = -log10(tolerance) (adaptive)."""

    label: str
    base: SolverConfig

    @property
    def adaptive(self) -> bool:
        return self.base.adaptive

    @property
    def rungs(self) -> int:
        return len(STEP_LADDER) if not self.adaptive else int(MAX_TOL_EXP / QUARTER)

    def param(self, k: int) -> float:
        return float(STEP_LADDER[k]) if not self.adaptive else (k + 4) * QUARTER  # tolerance 1e-1 at rung 0

    def at(self, p: float) -> SolverConfig:
        if not self.adaptive:
            return dataclasses.replace(self.base, steps=int(round(p)))
        tol = float(f"{10.0 ** -p:.3g}")  # 3 digits: a readable pinned value
        return dataclasses.replace(self.base, rtol=tol, atol=tol)

    def start(self, target: float) -> int:
        """Where the search starts: 8 steps; a tolerance a decade below the target."""
        if not self.adaptive:
            return STEP_LADDER.index(8)
        return min(self.rungs - 1, max(0, round((-math.log10(target) + 1) / QUARTER) - 4))

    def jump(self) -> int:
        """Rungs per gallop step: twice the steps; a decade of tolerance."""
        return 6 if not self.adaptive else 4

    def resolution(self) -> float:
        """Refine the winner's parameter down to this: one step; 1/32 decade."""
        return 1.0 if not self.adaptive else QUARTER / 8

    def up(self, cfg: SolverConfig) -> SolverConfig:
        """The next more accurate setting after ``cfg``: ~12 % more steps; a quarter decade tighter."""
        if not self.adaptive:
            return dataclasses.replace(cfg, steps=max(cfg.steps + 1, math.ceil(cfg.steps * STEP_RATIO)))
        return self.at(-math.log10(cfg.rtol) + QUARTER)


# latent control's weight exponents the pilot also tries (beside 1), for the solvers in WEIGHTED: where a
# model's latent error is made near t_eps (quantised data) a steeper weight is cheaper for the same p99,
# elsewhere 1 is (benchmarks/README.md, "weight exponent")
WEIGHT_POWERS = (1.25, 1.75)
WEIGHTED = frozenset({"adams4", "adams5"})


def families(base: SolverConfig, noise: float = 0.0, noise_ddim: Optional[float] = None) -> list[Family]:
    """Every solver of the product (``SOLVERS``) as a family: adaptive solvers with ``base``'s error
    control and time variable, with the noise floor and without (the floor is one level for the
    whole run, the worst over t: where the noise is large only near t_eps it costs accuracy elsewhere);
    fixed-step solvers on every time grid. Adaptive ones first (they set the NFE budget early), base's
    solver first among them.
    The floor is ``noise`` (of dx/dt) for solvers stepping on x, ``noise_ddim`` (of the DDIM form's
    eps_hat; ``noise`` when None) for those stepping on it (``EPS_SOLVERS``). Solvers in ``WEIGHTED``
    under latent control also come with each of ``WEIGHT_POWERS`` as latent control's weight exponent."""
    out = []
    # base's own solver first (the job's default: for a network the cheapest so far), so the NFE budget
    # that stops the other families early is set before the costly ones run
    for name in sorted((n for n, v in SOLVERS.items() if v.adaptive), key=lambda n: n != base.name):
        b = dataclasses.replace(base, name=name, steps=SolverConfig.steps, grid=SolverConfig.grid)
        level = noise_ddim if name in EPS_SOLVERS and noise_ddim is not None else noise
        powers = (1.0,) + (WEIGHT_POWERS if name in WEIGHTED and base.control == "latent" else ())
        for nz in ((level, 0.0) if level > 0 else (0.0,)):
            for g in powers:
                label = f"{name}{' noise floor' if nz else ''}{f' weight^{g:g}' if g != 1 else ''}"
                out.append(Family(label, dataclasses.replace(b, noise=nz, weight_power=g)))
    for name, solver in SOLVERS.items():
        if solver.adaptive:
            continue
        for grid in GRIDS:
            out.append(Family(f"{name} {grid}", SolverConfig(name=name, steps=8, grid=grid, t_eps=base.t_eps)))
    return out


def reference_config(t_eps: float, target: float = 1e-3) -> SolverConfig:
    """The much tighter run the pilot measures against (latent control, float64 state): tolerance 1e-7,
    or target/1000 when that is tighter."""
    tol = min(1e-7, float(f"{target * 1e-3:.1g}"))
    return SolverConfig("dopri5", rtol=tol, atol=tol, t_eps=t_eps, time_var="t", control="latent",
                        max_steps=100_000)


# ---- the search -----------------------------------------------------------------------------------

def _figures(err: np.ndarray, failed: int) -> dict:
    return {"p50": float(np.median(err)), "p99": float(np.quantile(err, 0.99)), "max": float(err.max()),
            "failed": int(failed)}


class _Sets:
    """The fit and held-out sets with their reference latents; ``measure(cfg, which)`` encodes one set."""

    def __init__(self, model, model_ref, sde, fit, held, dtype, ref_cfg, cond_fit=None, cond_held=None):
        self.model, self.sde, self.dtype = model, sde, dtype
        self.x = {"fit": fit, "held": held}
        self.cond = {"fit": cond_fit, "held": cond_held}
        self.ref, self.ref_nfe = {}, {}
        for k in ("fit", "held"):
            if self.x[k] is None:
                continue
            r = encode(model_ref, sde, self.x[k].to(F64), ref_cfg, cond=self.cond[k])
            self.ref[k] = r.x.reshape(r.x.shape[0], -1).to(F64)
            self.ref_nfe[k] = float(r.nfe.double().mean())
        self.runs = 0

    def measure(self, cfg: SolverConfig, which: str) -> tuple[dict, float]:
        """(p50/p99/max/failed figures, mean NFE) of ``cfg`` on one set; a sample the solver could not
        finish counts as an infinite error."""
        x = self.x[which]
        r = encode(self.model, self.sde, x.to(self.dtype), cfg, cond=self.cond[which])
        self.runs += 1
        err = (r.x.to(F64).reshape(x.shape[0], -1) - self.ref[which]).abs().amax(1)
        err = torch.where(r.ok, err, torch.full_like(err, math.inf)).cpu().numpy()
        return _figures(err, int((~r.ok).sum())), float(r.nfe.double().mean())


@dataclass
class PilotResult:
    """The chosen setting, whether its held-out p99 met the target, and every setting measured."""

    target: float
    choice: SolverConfig
    met: bool
    curve: list[dict]
    n_fit: int
    n_held: int
    reference: dict
    stepped_up: int = 0
    note: str = ""

    def to_dict(self) -> dict:
        return {"target": self.target, "state": "done", "met": self.met, "margin": MARGIN, "n_fit": self.n_fit,
                "n_held": self.n_held, "reference": self.reference, "choice": self.choice.to_dict(),
                "stepped_up": self.stepped_up, "note": self.note, "curve": self.curve}


Progress = Callable[[int, int, str], None]


def _quiet(done: int, total: int, what: str) -> None:
    pass


@torch.inference_mode()
def search(model: ScoreModel, sde: SDE, fit: torch.Tensor, held: Optional[torch.Tensor], target: float,
           fams: list[Family], dtype: torch.dtype = torch.float32, model_ref: ScoreModel | None = None,
           ref_cfg: SolverConfig | None = None, cond_fit=None, cond_held=None,
           progress: Progress = _quiet) -> PilotResult:
    """The pilot (module docstring): the cheapest setting of ``fams`` whose fit-set p99 is at most
    ``target / MARGIN``, confirmed on ``held`` (stepping up while its held-out p99 exceeds ``target``).

    Without any setting reaching ``target / MARGIN`` on the fit set, the cheapest reaching ``target``
    is taken, else the most accurate measured (``met`` False unless its held-out p99 meets the target).
    ``progress(done, total, what)`` is called as the reference, each family and the check end.
    """
    if not (isinstance(target, (int, float)) and not isinstance(target, bool) and math.isfinite(target)
            and target > 0):
        raise SolverError(f"the latent error target must be a number > 0; got {target!r}")
    if not fams:
        raise SolverError("the pilot needs at least one solver family")
    total = len(fams) + 3
    ref_cfg = ref_cfg or reference_config(fams[0].base.t_eps, target)
    sets = _Sets(model, model_ref or model, sde, fit, held, dtype, ref_cfg, cond_fit, cond_held)
    progress(1, total, "reference")
    goal = target / MARGIN
    curve: list[dict] = []
    seen: dict[str, dict] = {}

    def run(fam: Family, cfg: SolverConfig) -> dict | None:
        key = repr(sorted(cfg.to_dict().items()))
        if key in seen:
            return seen[key]
        try:
            fig, nfe = sets.measure(cfg, "fit")
        except SolverError:  # a grid or time variable this SDE cannot use (flow: alpha = 0 at T)
            seen[key] = None
            return None
        row = {"family": fam.label, "setting": cfg.to_dict(), "nfe_mean": nfe, "fit": fig}
        curve.append(row)
        seen[key] = row
        return row

    best: dict | None = None  # the cheapest row meeting the goal so far
    winners: dict[str, tuple[Family, float, float | None]] = {}  # label -> (family, good param, bad param)
    for i, fam in enumerate(fams):
        found = _search_family(fam, run, goal, target, lambda: best["nfe_mean"] if best else math.inf)
        if found is not None:
            p_good, p_bad, row = found
            winners[fam.label] = (fam, p_good, p_bad)
            if best is None or row["nfe_mean"] < best["nfe_mean"]:
                best = row
        progress(i + 2, total, fam.label)
    # refine by bisection between the last two rungs of every family within one rung's cost of the best
    if best is not None:
        for fam, p_good, p_bad in list(winners.values()):
            row = seen[repr(sorted(fam.at(p_good).to_dict().items()))]
            if p_bad is None or row["nfe_mean"] > best["nfe_mean"] * 1.25:
                continue
            while abs(p_good - p_bad) > fam.resolution() * 1.01:
                mid = (p_good + p_bad) / 2
                if not fam.adaptive:
                    mid = float(math.floor(mid))
                    if mid in (p_good, p_bad):
                        break
                r = run(fam, fam.at(mid))
                if r is not None and r["fit"]["p99"] <= goal:
                    p_good, row = mid, r
                else:
                    p_bad = mid
            winners[fam.label] = (fam, p_good, p_bad)
            if row["nfe_mean"] < best["nfe_mean"]:
                best = row
    progress(total - 1, total, "refine")
    note = ""
    if best is None:
        ok = [r for r in curve if r["fit"]["p99"] <= target]
        if ok:
            best = min(ok, key=lambda r: r["nfe_mean"])
            note = f"no setting reached p99 {goal:.2g} (target / {MARGIN:g}) on the fit set; took the cheapest under the target"
        elif curve:
            best = min(curve, key=lambda r: (r["fit"]["p99"], r["nfe_mean"]))
            note = "no setting met the target on the fit set; took the most accurate measured"
        else:
            raise SolverError("the pilot could not run any solver setting on this model")
    fam_of = {f.label: f for f in fams}
    fam = fam_of[best["family"]]
    choice = SolverConfig(**{**dataclasses.asdict(fam.base), **best["setting"]})
    # held-out figures for every family's best (the curve's summary) and the check of the choice
    for label, (f, p_good, _) in winners.items():
        _held(sets, seen[repr(sorted(f.at(p_good).to_dict().items()))], f.at(p_good))
    stepped = 0
    row = best
    if held is not None:
        _held(sets, row, choice)
        # step up only from a choice that met the target on the fit set (a fallback is as good as it gets)
        while row["held"]["p99"] > target and row["fit"]["p99"] <= target and stepped < MAX_STEP_UPS:
            nxt = fam.up(choice)
            if nxt == choice:
                break
            r = run(fam, nxt)
            if r is None:
                break
            _held(sets, r, nxt)
            choice, row, stepped = nxt, r, stepped + 1
        if stepped:
            note = (note + "; " if note else "") + (
                f"held-out p99 above the target: stepped up {stepped} rung(s) of {fam.label}")
    row["chosen"] = True
    met = (row.get("held") or row["fit"])["p99"] <= target
    progress(total, total, "held-out check")
    reference = {"setting": ref_cfg.to_dict(), "dtype": "float64",
                 "nfe_mean": sets.ref_nfe.get("fit", 0.0)}
    curve.sort(key=lambda r: (r["family"], r["nfe_mean"]))
    return PilotResult(target, choice, met, curve, int(fit.shape[0]), 0 if held is None else int(held.shape[0]),
                       reference, stepped, note)


def _held(sets: _Sets, row: dict, cfg: SolverConfig) -> None:
    if "held" not in row and "held" in sets.ref:
        row["held"], row["nfe_mean_held"] = sets.measure(cfg, "held")


def _predict(fam: Family, pts: list[tuple[int, dict]], goal: float) -> tuple[float, float] | None:
    """(rung, NFE) where the family's p99 reaches ``goal``, extrapolated log-log through its last two
    measured rungs (log steps or log tolerance against log p99 and log NFE); None when the error did
    not fall between them (pre-asymptotic, or a floor)."""
    (k1, r1), (k2, r2) = pts[-2], pts[-1]
    x1, x2 = (math.log(fam.param(k1)), math.log(fam.param(k2))) if not fam.adaptive else (fam.param(k1), fam.param(k2))
    e1, e2 = r1["fit"]["p99"], r2["fit"]["p99"]
    if not (0 < e2 < e1 < math.inf) or x2 <= x1:
        return None
    slope = (math.log(e2) - math.log(e1)) / (x2 - x1)
    x = x2 + (math.log(goal) - math.log(e2)) / slope
    n1, n2 = max(r1["nfe_mean"], 1.0), max(r2["nfe_mean"], 1.0)
    nfe = n2 * math.exp(min(50.0, (x - x2) * (math.log(n2) - math.log(n1)) / (x2 - x1)))  # no overflow
    if not fam.adaptive:
        steps = math.exp(min(x, 30.0))
        rung = next((i for i, n in enumerate(STEP_LADDER) if n >= steps), len(STEP_LADDER) - 1)
    else:
        rung = min(fam.rungs - 1, max(0, math.ceil(min(x, 1e3) / QUARTER - 4)))
    return rung, nfe


PRUNE = 1.5  # a family stops when its extrapolated NFE at the goal exceeds PRUNE x the best so far
STALL = 0.5  # ... or when two more gallops up its ladder did not halve its p99


def _search_family(fam: Family, run, goal: float, target: float, budget: Callable[[], float]):
    """(good param, bad param or None, row): the family's cheapest rung meeting ``goal`` on the fit set.

    From ``fam.start``: up the ladder (a gallop of ``fam.jump`` rungs, or to the rung the last two
    measurements extrapolate to) until a rung meets the goal, or down while the start already meets it;
    then bisection on the rungs between the last miss and the first hit. None when no rung meets it
    before the family costs more NFE than ``budget()`` (measured, or extrapolated: ``PRUNE``), once its
    samples hit the step limit, or once its error stalls (``STALL``: the noise floor's plateau)."""
    k = fam.start(target)
    row = run(fam, fam.at(fam.param(k)))
    if row is None:
        return None
    good = bad = None
    if row["fit"]["p99"] <= goal:
        good, good_row = k, row
        while good > 0:  # gallop down while it still meets the goal
            k = max(0, good - fam.jump())
            r = run(fam, fam.at(fam.param(k)))
            if r is None or r["fit"]["p99"] > goal:
                bad = k
                break
            good, good_row = k, r
    else:
        bad, pts = k, [(k, row)]
        while True:
            if row["nfe_mean"] >= budget() or bad == fam.rungs - 1:
                return None  # more accurate rungs cost even more than the best so far
            nxt = bad + fam.jump()
            guess = _predict(fam, pts, goal) if len(pts) >= 2 else None
            if guess is not None:
                if guess[1] > PRUNE * budget():
                    return None
                nxt = min(bad + 2 * fam.jump(), max(bad + 1, guess[0]))
            if not fam.adaptive and math.isfinite(budget()):  # a fixed-step rung's NFE is known before it runs
                per_step = row["nfe_mean"] / fam.param(bad)
                affordable = [i for i, n in enumerate(STEP_LADDER) if n * per_step <= PRUNE * budget()]
                nxt = min(nxt, affordable[-1] if affordable else -1)
                if nxt <= bad:
                    return None
            k = min(fam.rungs - 1, nxt)
            row = run(fam, fam.at(fam.param(k)))
            if row is None:
                return None
            if row["fit"]["p99"] <= goal:
                good, good_row = k, row
                break
            bad = k
            pts.append((k, row))
            if row["fit"]["failed"] or (len(pts) >= 3 and row["fit"]["p99"] > STALL * pts[-3][1]["fit"]["p99"]):
                return None  # samples hit the step limit, or the error stalled (a floor): more accuracy is not there
    while bad is not None and good - bad > 1:
        mid = (good + bad) // 2
        r = run(fam, fam.at(fam.param(mid)))
        if r is not None and r["fit"]["p99"] <= goal:
            good, good_row = mid, r
        else:
            bad = mid
    return fam.param(good), (None if bad is None else fam.param(bad)), good_row


# ---- the pilot of a job ---------------------------------------------------------------------------

def pilot_subsets(source, n: int = PILOT_N, seed: int = PILOT_SEED):
    """Two disjoint seeded subsets of a source, ``n`` samples each (half of it each when it has fewer than
    2n; the held-out one is empty for a single sample): ((x, labels) fit, (x, labels) held), in index order."""
    total = len(source)
    m = min(2 * n, total)
    idx = np.random.default_rng(seed).choice(total, size=m, replace=False)
    k = min(n, max(1, (m + 1) // 2))

    def rows(sel):
        sel = np.sort(sel)
        if sel.size == 0:
            return None, None
        batches = [source.read(int(i), int(i) + 1) for i in sel]
        x = np.concatenate([b.x for b in batches]).astype(np.float64)
        labels = None if batches[0].labels is None else np.concatenate([b.labels for b in batches])
        return x, labels

    return rows(idx[:k]), rows(idx[k:])


def latent_pilot(work: ScoreModel, hi: ScoreModel, sde: SDE, fit: tuple, held: tuple, base: SolverConfig,
                 dtype: str, target: float, device: torch.device | str = "cpu", seed: int = PILOT_SEED,
                 progress: Progress = _quiet) -> tuple[SolverConfig, dict]:
    """``--latent-tol``: measure the right-hand side's noise, run the pilot, return (choice, pinned record).

    ``work`` is the model at the job's precision (the working one) and ``hi`` the same in float64
    (``fp64``; an exact score in a float64 state), for the reference and the noise floor. ``fit`` and
    ``held`` are (samples, labels or None) of ``pilot_subsets`` (labels: what the rows are conditioned
    on, None for an unconditional model). ``base`` is the job's solver setting (its t_eps, and the
    adaptive solvers' control and time variable).
    """
    dev = torch.device(device)
    (xf, lf), (xh, lh) = fit, held
    cf = cond_tensor(lf, dev)
    ch = cond_tensor(lh, dev) if xh is not None else None
    x_fit = torch.from_numpy(np.asarray(xf, dtype=np.float64)).to(dev)
    x_held = None if xh is None else torch.from_numpy(np.asarray(xh, dtype=np.float64)).to(dev)
    dt = F64 if dtype == "float64" else torch.float32
    # 2 digits: stable pinned values; of dx/dt, and of eps_hat for the solvers on the DDIM form
    noise = float(f"{rhs_noise(work, hi, sde, x_fit, base.t_eps, dt, cond=cf):.1e}")
    noise_y = float(f"{rhs_noise(work, hi, sde, x_fit, base.t_eps, dt, cond=cf, ddim=True):.1e}")
    res = search(work, sde, x_fit, x_held, target, families(base, noise, noise_y), dt, model_ref=hi,
                 cond_fit=cf, cond_held=ch, progress=progress)
    return res.choice, {**res.to_dict(), "seed": seed, "noise": noise, "noise_ddim": noise_y}


# ---- the pinned record ----------------------------------------------------------------------------

def pending_record(target: float) -> dict:
    """What a store pins for ``--latent-tol`` until the pilot task ran (its solver is then a placeholder)."""
    return {"target": target, "state": "pending"}


def pending(rec: Optional[dict]) -> bool:
    """Whether a pinned pilot record still waits for its pilot run."""
    return bool(rec) and rec.get("state") == "pending"


def setting_text(ch: dict) -> str:
    """A pinned solver setting in words (the CLI, ``status`` and the benchmarks' tables)."""
    if ch.get("rtol") is not None:
        floor = f", noise floor {ch['noise']:g}" if ch.get("noise") else ""
        power = f", weight^{ch['weight_power']:g}" if ch.get("weight_power", 1) != 1 else ""
        return f"{ch.get('name')} tol {ch.get('rtol'):g}{floor}{power}"
    return f"{ch.get('name')} {ch.get('steps')} steps ({ch.get('grid')} grid)"


def _chosen_row(rec: dict) -> Optional[dict]:
    rows = rec.get("curve") or rec.get("candidates") or []
    return (next((r for r in rows if r.get("chosen")), None)
            or next((r for r in rows if r.get("setting") == rec.get("choice")), None))


def describe(rec: dict) -> str:
    """One line for the CLI: what the pilot chose and why (records of earlier versions too)."""
    if "skipped" in rec:
        return f"latent-tol {rec['target']:g}: no pilot ({rec['skipped']} given)"
    if pending(rec):
        return f"latent-tol {rec['target']:g}: pilot not run yet (the next extract or resume runs it)"
    ch = rec.get("choice") or {}
    row = _chosen_row(rec)
    what = setting_text(ch)
    if "curve" not in rec:  # a record of the first pilot (one subset, no held-out check)
        figs = f" (pilot p99 {row['p99']:.1e}, max {row['max']:.1e}, {row['nfe_mean']:.0f} NFE/sample)" if row else ""
        if rec.get("met"):
            return f"latent-tol {rec['target']:g}: pilot on {rec['n']} samples chose {what}{figs}"
        return (f"latent-tol {rec['target']:g}: NOT met by any candidate on {rec['n']} pilot samples; using the most "
                f"accurate, {what}{figs}: this model's latents cannot be made that reproducible at this precision")
    held = (row or {}).get("held")
    figs = (f": held-out p99 {held['p99']:.1e} (fit {row['fit']['p99']:.1e}), {row['nfe_mean']:.0f} NFE/sample"
            if row and held else f": fit p99 {row['fit']['p99']:.1e}, {row['nfe_mean']:.0f} NFE/sample" if row else "")
    head = (f"latent-tol {rec['target']:g}: pilot ({len(rec['curve'])} settings on {rec['n_fit']} samples, "
            f"checked on {rec['n_held']} others) chose {what}{figs}")
    note = f"; {rec['note']}" if rec.get("note") else ""
    if rec.get("met"):
        return head + note
    return (head + note + f"; the target is NOT met: this model's latents cannot be made that reproducible at "
            "this precision")


def curve_table(rec: dict) -> list[str]:
    """The pilot's curve as a compact table (``pflatents status``): one row per solver family, its best
    setting (the cheapest meeting target / margin on the fit set, with its held-out figures; for a
    family that did not get there within the NFE of the best, its most accurate setting measured), the
    choice starred."""
    curve = rec.get("curve") or []
    if not curve:
        return []
    rows = []
    for fam in dict.fromkeys(r["family"] for r in curve):
        mine = [r for r in curve if r["family"] == fam]
        checked = [r for r in mine if "held" in r]
        rows.append(min(checked, key=lambda r: (not r.get("chosen"), r["nfe_mean"])) if checked
                    else min(mine, key=lambda r: (r["fit"]["p99"], r["nfe_mean"])))
    rows.sort(key=lambda r: r["nfe_mean"])
    fmt = "{:<2}{:<31} {:<44} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8}"
    e = lambda v: "-" if v is None else f"{v:.1e}"  # noqa: E731
    out = [f"target p99 {rec['target']:g}: each family's cheapest setting with fit p99 <= target / "
           f"{rec.get('margin', MARGIN):g} ({len(curve)} settings measured on {rec.get('n_fit')} + {rec.get('n_held')} "
           "samples); - : not held-out checked",
           fmt.format("", "family", "setting", "NFE", "fit p50", "fit p99", "fit max", "held p99", "held max")]
    for r in rows:
        f, h = r["fit"], r.get("held") or {}
        out.append(fmt.format("*" if r.get("chosen") else "", r["family"], setting_text(r["setting"]), f"{r['nfe_mean']:.1f}",
                              e(f["p50"]), e(f["p99"]), e(f["max"]), e(h.get("p99")), e(h.get("max"))))
    return out
