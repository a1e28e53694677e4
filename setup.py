"""epmoe: expert-parallel Mixture-of-Experts training for PyTorch.

`comm/` and `launch/` live at the top of the repository but install as `epmoe.comm` and
`epmoe.launch` (package_dir): nothing named `comm` or `launch` lands in site-packages,
where `comm` is already Jupyter's package.
"""

from setuptools import setup

PACKAGES = {
    "epmoe": "epmoe",
    "epmoe.data": "epmoe/data",
    "epmoe.hf": "epmoe/hf",
    "epmoe.model": "epmoe/model",
    "epmoe.parallel": "epmoe/parallel",
    "epmoe.placement": "epmoe/placement",
    "epmoe.train": "epmoe/train",
    "epmoe.upcycle": "epmoe/upcycle",
    "epmoe.comm": "comm",
    "epmoe.launch": "launch",
    "epmoe.conf": "conf",  # the Hydra YAML tree, found as pkg://epmoe.conf
}

setup(
    name="epmoe",
    version="0.1.0",
    description="Expert-parallel Mixture-of-Experts training for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"epmoe.conf": ["*.yaml", "*/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "hydra-core>=1.3,<1.4",
        "omegaconf>=2.3",
        "wandb>=0.17",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "numpy>=1.24",
        "scipy>=1.9",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "datasets>=2.16",  # local Hugging Face datasets (data=hf, prepare's parquet / arrow / save_to_disk INPUTs)
        "tensorboard>=2.14",  # logger=tensorboard, through torch.utils.tensorboard
    ],
    extras_require={
        # MPI without a system MPI: the mpich wheel brings libmpi and mpiexec into the venv
        "mpi": ["mpi4py>=4", "mpich"],
        # the DeepSpeed runner (launcher=deepspeed); pure Python, its ops compile on first use only
        "deepspeed": ["deepspeed>=0.14"],
        # epmoe reads and writes Hugging Face folders itself; transformers is the reference its tests
        # compare against, and what loads an export
        "hf": ["transformers>=4.51"],
        "dev": ["transformers>=4.51", "pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "hypothesis>=6.100", "setuptools>=70.1",
                "mpi4py>=4", "mpich", "deepspeed>=0.14"],
    },
    entry_points={
        "console_scripts": [
            "epmoe-train=epmoe.train.__main__:main",
            "epmoe-launch=epmoe.launch.__main__:main",
            "epmoe-checkpoint=epmoe.train.checkpoint_cli:main",
            "epmoe-hf=epmoe.hf.__main__:main",
            "epmoe-data=epmoe.data.__main__:main",
            "epmoe-generate=epmoe.generate:main",
            "epmoe-eval=epmoe.eval:main",
            "epmoe-plot=epmoe.plot:main",
            "epmoe-upcycle=epmoe.upcycle.__main__:main",
        ]
    },
)
