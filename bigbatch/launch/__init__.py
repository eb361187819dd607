"""Launchers: SLURM job scripts, submission and requeue."""
