"""epmoe.launch: the launcher CLI that starts ranks (torchrun, DeepSpeed, mpirun, Slurm).

Installed as `epmoe.launch` (setup.py's package_dir), never as a top-level `launch`:
`python -m epmoe.launch <hydra overrides>` validates the config once, then starts the ranks.
"""
