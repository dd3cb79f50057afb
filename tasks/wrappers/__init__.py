"""pflatents.tasks.wrappers."""
