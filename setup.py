from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="moe_dist",
    version="0.1.0",
    description="Readable, correct and fast Mixture-of-Experts Transformer training in PyTorch",
    long_description=Path(__file__).with_name("README.md").read_text() if Path(__file__).with_name("README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["moe_dist", "moe_dist.*"]),
    # torch>=2.5 (SDPA enable_gqa, public DTensor) is satisfied by an installed torch (CPU or CUDA
    # build), so pip never replaces it. CI tests torch 2.13; bf16 experts use torch._grouped_mm where
    # it exists (2.8+) and the per-expert loop otherwise.
    install_requires=["torch>=2.5", "pyyaml", "tqdm", "tokenizers", "safetensors", "numpy", "tensorboard", "matplotlib"],
    extras_require={
        "dev": ["pytest", "transformers"],
        "deepspeed": ["deepspeed"],
        "mpi": ["mpi4py"],
    },
    entry_points={"console_scripts": ["moe-dist = moe_dist.cli:main"]},
)
