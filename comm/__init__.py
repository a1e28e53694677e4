"""epmoe.comm: process groups, collectives and token dispatchers for expert parallelism.

Installed as `epmoe.comm` (setup.py's package_dir), never as a top-level `comm`. Empty until
expert parallelism lands; the single-device dispatcher lives in `epmoe.model.dispatch`.
"""
