"""`pflatents analyze STORE`: parse the flags, run ``analyze_store``, print the summary (JSON or a table)."""

from __future__ import annotations

import argparse
import json
import sys

from pflatents.flows.cli.common import EXIT_OK

__all__ = ["register", "cmd_analyze"]


def register(sub) -> None:
    """Add the ``analyze`` subcommand."""
    p = sub.add_parser("analyze", help="independence/normality statistics, reconstruction check, ICA")
    p.add_argument("store")
    p.add_argument("--reconstruct", default=None, help="N (a seeded subset) or all: decode and compare")
    p.add_argument("--ica", action="store_true", help="compare with FastICA on the data")
    p.add_argument("--ica-samples", type=int, default=20000, help="rows of the seeded ICA subsample")
    p.add_argument("--sources", default=None, help="known sources (.npy, N x D) for Amari distances")
    p.add_argument("--report", default=None, help="write report.html, report.md and PNGs into DIR")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (and nothing else on stdout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the bar counts the analysis' steps, "
                   "on stderr)")
    p.add_argument("--partial", action="store_true", help="analyse only the done shards of an incomplete store")
    p.add_argument("--overwrite", action="store_true", help="replace a stored analysis made with other settings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--dcor-pairs", type=int, default=8)
    p.add_argument("--rows", type=int, default=None, help="rows per dask chunk (default: ~32 MiB of latents; results do not depend on it)")
    p.add_argument("--runner", default="local", help="local | dask | dask://HOST:PORT (reconstruction)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--prior", type=int, default=300, metavar="M",
                   help="decode M seeded prior draws and compare them with the data (MMD, classifier, "
                        "nearest neighbours); 0 skips (default 300)")
    p.add_argument("--stability", type=int, default=0, metavar="N",
                   help="re-encode N seeded stored samples with the pinned solver made ~10x more accurate; "
                        "per-sample latent drift p50/p99/max against the pinned --latent-tol (else 1e-3)")
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(a: argparse.Namespace) -> int:
    """Run the analysis; print the summary."""
    from pflatents.flows.analyze import analyze_store

    summary = analyze_store(a.store, reconstruct=a.reconstruct, ica=a.ica, ica_samples=a.ica_samples,
                            sources=a.sources, report=a.report, partial=a.partial, overwrite=a.overwrite,
                            seed=a.seed, alpha=a.alpha, dcor_pairs=a.dcor_pairs, rows=a.rows, runner=a.runner,
                            workers=a.workers, device=a.device, prior=a.prior, stability=a.stability,
                            progress=not a.no_progress)
    if a.json:
        print(json.dumps(summary, indent=2))
    else:
        from pflatents.tasks.analysis.report import summary_table

        print(summary_table(summary))
        if a.report:
            print(f"report: {summary['report']['html']}")
    sys.stdout.flush()
    return EXIT_OK
