"""`pflatents demo`: train on the sklearn digits, extract all latents, analyse, report (``run_demo``)."""

from __future__ import annotations

import argparse

from pflatents.flows.demo import DEFAULT_TRAIN_STEPS

__all__ = ["register", "cmd_demo"]


def register(sub) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser("demo", help="train on sklearn digits, extract all latents, analyse, report")
    p.add_argument("--out", default="pflatents-demo", help="output directory (default ./pflatents-demo)")
    p.add_argument("--train-steps", type=int, default=DEFAULT_TRAIN_STEPS,
                   help=f"training steps of the digits model (default {DEFAULT_TRAIN_STEPS})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)


def cmd_demo(a: argparse.Namespace) -> int:
    from pflatents.flows.demo import run_demo

    return run_demo(a.out, train_steps=a.train_steps, seed=a.seed, progress=not a.no_progress)
