"""The report's figures (matplotlib Agg): each function returns one small PNG as bytes.

Every figure is sized for a column of about 600 pixels and drawn at ``DPI``; an image grid shows
at most 16 samples and a scatter at most a few thousand points, so a report stays well under a few MB
whatever the store's size. Pure numpy / scipy / matplotlib.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

__all__ = ["DPI", "image_pairs", "projection", "spectrum", "error_histogram", "heatmaps", "qq_summary",
           "per_dim_grid", "to_image"]

DPI = 96
DATA_GREY, DECODE_ORANGE, OK_BLUE, BAD_RED = "#9aa0a6", "#e8710a", "#1a73e8", "#d93025"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 8,
                         "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False,
                         "axes.spines.right": False})
    return plt


def _png(fig: Any) -> bytes:
    """The figure as PNG bytes (no timestamp in the metadata: the same inputs give the same bytes)."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.05,
                metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def to_image(x: np.ndarray) -> np.ndarray:
    """CHW in [-1, 1] -> HWC (or HW) in [0, 1]."""
    img = np.clip((np.asarray(x, dtype=np.float64) + 1) / 2, 0, 1)
    return img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)


def image_pairs(top: np.ndarray, bottom: np.ndarray, labels: tuple[str, str],
                notes: list[str] | None = None, per_row: int = 8) -> bytes:
    """Samples (N, C, H, W) in [-1, 1]: each of ``top`` above its partner in ``bottom``, ``per_row``
    pairs to a band; ``notes`` (one per pair) under the bottom image."""
    plt = _plt()
    n = min(len(top), len(bottom))
    cols = min(per_row, n)
    bands = -(-n // cols)
    fig, axes = plt.subplots(2 * bands, cols, figsize=(0.75 * cols + 0.9, (1.6 if notes else 1.5) * bands),
                             squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.set_xticks([])
        ax.set_yticks([])
        for sp in ax.spines.values():
            sp.set_visible(False)
        band, row, col = k // (2 * cols), (k // cols) % 2, k % cols
        i = band * cols + col
        if i >= n:
            continue
        ax.imshow(to_image((top if row == 0 else bottom)[i]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        if col == 0:
            ax.set_ylabel(labels[row], rotation=0, ha="right", va="center", fontsize=8)
        if row == 1 and notes:
            ax.set_xlabel(notes[i], fontsize=7, labelpad=1)
    fig.subplots_adjust(wspace=0.06, hspace=0.12 if not notes else 0.35)
    return _png(fig)


def projection(data: np.ndarray, decodes: np.ndarray) -> bytes:
    """Decodes over the data on the data's first two principal axes (a histogram for 1-D data)."""
    plt = _plt()
    x = np.asarray(data, dtype=np.float64).reshape(len(data), -1)
    y = np.asarray(decodes, dtype=np.float64).reshape(len(decodes), -1)
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    if x.shape[1] == 1:
        bins = np.histogram_bin_edges(np.concatenate([x[:, 0], y[:, 0]]), bins=40)
        ax.hist(x[:, 0], bins=bins, density=True, color=DATA_GREY, label=f"data ({len(x)})")
        ax.hist(y[:, 0], bins=bins, density=True, histtype="step", lw=1.5, color=DECODE_ORANGE,
                label=f"prior decodes ({len(y)})")
        ax.set_xlabel("value")
    else:
        mu = x.mean(0)
        _, sv, vt = np.linalg.svd(x - mu, full_matrices=False)
        share = sv ** 2 / max(float((sv ** 2).sum()), 1e-300)
        px, py = (x - mu) @ vt[:2].T, (y - mu) @ vt[:2].T
        ax.scatter(px[:, 0], px[:, 1], s=4, color=DATA_GREY, alpha=0.5, lw=0, label=f"data ({len(x)})")
        ax.scatter(py[:, 0], py[:, 1], s=9, color=DECODE_ORANGE, alpha=0.85, lw=0,
                   label=f"prior decodes ({len(y)})")
        ax.set_xlabel(f"principal axis 1 ({share[0]:.0%} of the data's variance)")
        ax.set_ylabel(f"principal axis 2 ({share[1]:.0%})")
    ax.legend(loc="best", frameon=False, markerscale=2)
    return _png(fig)


def spectrum(eigenvalues: np.ndarray, floor: float) -> bytes:
    """The data's covariance eigenvalues, largest first, on a log scale; those under the resolution
    floor (degenerate directions: no data variance to map) in red."""
    plt = _plt()
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1]
    bottom = floor * 1e-3 if floor > 0 else max(float(lam[lam > 0].min()) * 1e-3, 1e-300) if (lam > 0).any() else 1e-12
    shown = np.maximum(lam, bottom)
    deg = lam < floor
    k = np.arange(1, len(lam) + 1)
    fig, ax = plt.subplots(figsize=(4.6, 2.6))
    ax.semilogy(k, shown, color=OK_BLUE, lw=1)
    ax.plot(k[~deg], shown[~deg], "o", ms=3, color=OK_BLUE, label=f"spanned ({int((~deg).sum())})")
    if deg.any():
        ax.plot(k[deg], shown[deg], "x", ms=5, color=BAD_RED, label=f"degenerate ({int(deg.sum())})")
    ax.axhline(floor, color="k", ls="--", lw=0.8)
    ax.annotate("resolution floor", (1, floor), xytext=(0, 3), textcoords="offset points", ha="left",
                va="bottom", fontsize=7)
    ax.set_xlabel("data covariance eigenvalue, largest first")
    ax.set_ylabel("variance")
    ax.legend(loc="lower left", frameon=False)
    return _png(fig)


def error_histogram(errors: np.ndarray, label: str, extra: tuple[str, np.ndarray] | None = None) -> bytes:
    """Histogram of log10 per-sample errors (the largest marked); ``extra`` a second series."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 2.4))
    series = [(label, np.asarray(errors, dtype=np.float64), OK_BLUE)]
    if extra is not None:
        series.append((extra[0], np.asarray(extra[1], dtype=np.float64), DECODE_ORANGE))
    logs = [np.log10(np.maximum(e[np.isfinite(e)], 1e-16)) for _, e, _ in series]
    bins = np.histogram_bin_edges(np.concatenate(logs), bins=40)
    for (name, e, colour), lg in zip(series, logs):
        ax.hist(lg, bins=bins, color=colour, alpha=0.7 if extra is not None else 1.0,
                label=f"{name} (max {e.max():.2g}, {len(e)} samples)")
        ax.axvline(lg.max(), color=colour, lw=0.8, ls=":")
    ax.set_xlabel("log10 per-sample max |error|")
    ax.set_ylabel("samples")
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False, ncol=2)
    return _png(fig)


def _offdiag(r: np.ndarray) -> np.ndarray:
    r = np.array(r, dtype=np.float64)
    np.fill_diagonal(r, 0.0)
    return r


def heatmaps(panels: list[tuple[str, np.ndarray]], threshold: float | None, per_row: int = 2) -> bytes:
    """Off-diagonal matrices on one symmetric colour scale (diagonal zeroed), one shared colour bar
    with the pass line marked."""
    plt = _plt()
    mats = [_offdiag(m) for _, m in panels]
    lim = max([float(np.abs(m).max()) for m in mats if m.size] + [(threshold or 0) * 1.25, 1e-3])
    cols = min(per_row, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 0.8, 2.5 * rows), squeeze=False)
    im = None
    for ax, (title, _), m in zip(axes.ravel(), panels, mats):
        im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest" if len(m) <= 128 else "antialiased")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        top = float(np.abs(m).max()) if m.size else 0.0
        ax.set_xlabel(f"{len(m)} dims; max |off-diag| {top:.2g}" + ("\n(whitened: 0 by construction)"
                                                                     if 0 < len(m) and top < 1e-6 else ""), fontsize=7)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    bar = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, pad=0.03)
    if threshold:
        for t in (-threshold, threshold):
            bar.ax.axhline(t, color="k", lw=1)
        bar.set_label(f"correlation (black lines: pass line ±{threshold:.2g})", fontsize=7)
    return _png(fig)


def qq_summary(sample: np.ndarray, failing: np.ndarray | None = None) -> bytes:
    """Every coordinate's QQ curve against N(0, 1) as its deviation (sample quantile - normal quantile),
    in one panel; the grey band is +-3 standard errors of a sample quantile of N(0, 1) at this n.
    Coordinates the normality tests reject are drawn in red, on top."""
    from scipy import stats

    plt = _plt()
    z = np.asarray(sample, dtype=np.float64).reshape(len(sample), -1)
    n, d = z.shape
    lo = float(stats.norm.ppf(min(0.5, 2.0 / n)))
    q = np.linspace(lo, -lo, 121)
    p = stats.norm.cdf(q)
    dev = np.quantile(z, p, axis=0) - q[:, None]
    se = np.sqrt(p * (1 - p) / n) / stats.norm.pdf(q)
    bad = np.zeros(d, bool) if failing is None else np.asarray(failing, bool)[:d]
    fig, ax = plt.subplots(figsize=(4.6, 2.8))
    ax.fill_between(q, -3 * se, 3 * se, color="#e8eaed", lw=0, label="±3 s.e. under N(0, 1)")
    alpha = max(0.08, min(0.6, 8.0 / max(d, 1)))
    ax.plot(q, dev[:, ~bad], color=OK_BLUE, lw=0.7, alpha=alpha)
    if bad.any():
        ax.plot(q, dev[:, bad], color=BAD_RED, lw=0.9, alpha=0.9)
    ax.plot([], [], color=OK_BLUE, label=f"coordinates passing ({int((~bad).sum())})")
    ax.plot([], [], color=BAD_RED, label=f"rejected by the normality tests ({int(bad.sum())})")
    ax.axhline(0, color="k", lw=0.6)
    span = max(float(np.abs(dev).max()), float(3 * se.max()), 0.05)
    ax.set_ylim(-min(span, 3.0) * 1.1, min(span, 3.0) * 1.1)
    ax.set_xlabel("N(0, 1) quantile")
    ax.set_ylabel("sample - normal quantile")
    ax.legend(loc="upper center", frameon=False, fontsize=7)
    return _png(fig)


def per_dim_grid(sample: np.ndarray, kind: str, k: int = 16) -> bytes:
    """Histograms (``kind`` "hist") or QQ plots ("qq") of the first ``k`` coordinates against N(0, 1)."""
    from scipy import stats

    plt = _plt()
    z = np.asarray(sample, dtype=np.float64).reshape(len(sample), -1)
    k = min(k, z.shape[1])
    cols = min(4, k)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 1.45 * rows), squeeze=False)
    grid = np.linspace(-4, 4, 200)
    for j, ax in enumerate(axes.ravel()):
        if j >= k:
            ax.axis("off")
            continue
        if kind == "hist":
            ax.hist(z[:, j], bins=40, range=(-4, 4), density=True, color=OK_BLUE, alpha=0.6)
            ax.plot(grid, stats.norm.pdf(grid), "k-", lw=0.8)
        else:
            q = np.sort(z[:, j])
            ax.plot(stats.norm.ppf((np.arange(len(q)) + 0.5) / len(q)), q, ".", ms=1.5, color=OK_BLUE)
            ax.plot([-4, 4], [-4, 4], "k-", lw=0.8)
        ax.set_title(f"coordinate {j}", fontsize=7, pad=2)
        ax.tick_params(labelsize=6)
    fig.tight_layout(pad=0.3)
    return _png(fig)
