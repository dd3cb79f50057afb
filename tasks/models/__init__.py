"""pflatents.tasks.models."""
