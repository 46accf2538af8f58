"""The driver side of tunefleet: CLI, job spec, search space, trials, results."""
