"""pflatents flows."""
