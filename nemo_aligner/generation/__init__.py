"""Generation (the rollout engine of PPO and rejection sampling): sampling/length parameters and batched,
KV-cached decoding for any Hugging Face causal LM (the native engine), and vLLM as the accelerated engine."""

from nemo_aligner.generation.engine import generate
from nemo_aligner.generation.params import IGNORED_SAMPLING_KEYS, GenerationOutput, LengthParams, SamplingParams
from nemo_aligner.generation.sampling import response_seed
from nemo_aligner.generation.vllm_engine import VLLMConfig, VLLMEngine, draw_row_seeds, require_vllm, vllm_available

__all__ = ["GenerationOutput", "IGNORED_SAMPLING_KEYS", "LengthParams", "SamplingParams", "VLLMConfig", "VLLMEngine", "draw_row_seeds", "generate", "require_vllm",
           "response_seed", "vllm_available"]
