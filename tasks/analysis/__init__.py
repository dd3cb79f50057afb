"""pflatents.tasks.analysis."""
