"""nemo_aligner: align causal language models with human preferences (SFT, RM, PPO, DPO family, ...)."""

__version__ = "0.1.0"
