"""pflatents.tasks.training."""
