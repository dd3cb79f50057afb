"""pflatents storage."""
