"""Generation (the rollout engine of PPO and rejection sampling): sampling/length parameters and batched,
KV-cached decoding for any Hugging Face causal LM."""

from nemo_aligner.generation.engine import generate
from nemo_aligner.generation.params import IGNORED_SAMPLING_KEYS, GenerationOutput, LengthParams, SamplingParams
from nemo_aligner.generation.sampling import response_seed

__all__ = ["GenerationOutput", "IGNORED_SAMPLING_KEYS", "LengthParams", "SamplingParams", "generate", "response_seed"]
