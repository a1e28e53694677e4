"""epmoe.launch: the launcher CLI that starts ranks (torchrun, DeepSpeed, mpirun, Slurm).

Installed as `epmoe.launch` (setup.py's package_dir), never as a top-level `launch`. Empty
until expert parallelism lands; today `python -m epmoe.train` runs one process.
"""
