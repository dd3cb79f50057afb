"""pflatents tasks."""
