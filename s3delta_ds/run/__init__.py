"""The parts of a search or retrain run: plan and preflight, runtime preparation, evaluation and
metrics, checkpoints, reports, and launching processes (local, SLURM, the demo, the compat matrix)."""
