"""Stopping on signals, SLURM's side of a run (distributed environment, requeue) and submitit jobs."""
