"""trntrain's Hydra launcher for SLURM: `trntrain train -m hydra/launcher=slurm ...`."""
