"""pflatents.tasks.data."""
