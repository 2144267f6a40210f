"""Launching sweeps on a cluster scheduler: SLURM array jobs of launch/slurm_trn1.sbatch
(`trntrain train -m hydra/launcher=slurm`) and their status (`trntrain sweep status`)."""
