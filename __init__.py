"""pflatents: probability-flow ODE latents for whole datasets.

The installed package maps the repository's folders under one name:
``pflatents.flows`` (Prefect flows, the coordinator and the CLI), ``pflatents.tasks`` (units of
work: the ODE core, models, data sources, training, analysis, and the thin Prefect task wrappers)
and ``pflatents.storage`` (the Zarr v3 latent store). This module is the small public API for
notebooks; the ``pflatents`` command calls the same functions.
"""

from __future__ import annotations

__version__ = "0.1.0"
