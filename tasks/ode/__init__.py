"""pflatents.tasks.ode."""
