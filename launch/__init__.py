"""The `pretrain` command line and the local and Slurm launchers."""
