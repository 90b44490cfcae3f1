"""The vLLM engine settings every vLLM test uses, so that one engine (``VLLMEngine.shared``) serves the session, and
:func:`engine_and_native_greedy` (a policy's greedy responses from its engine and from its own model)."""

from __future__ import annotations

#: Eager mode (no torch.compile at start) and a batch limit the tests never exceed.
VLLM_TEST_KNOBS = {"enable": True, "enforce_eager": True, "max_num_seqs": 64}


def vllm_overrides(algo: str) -> list[str]:
    """Hydra overrides turning on vLLM for ``trainer.<algo>.vllm`` with :data:`VLLM_TEST_KNOBS`."""
    return [f"trainer.{algo}.vllm.{k}={str(v).lower()}" for k, v in VLLM_TEST_KNOBS.items()]


def vllm_test_config():
    """:class:`~nemo_aligner.generation.VLLMConfig` of :data:`VLLM_TEST_KNOBS`."""
    from nemo_aligner.generation import VLLMConfig

    return VLLMConfig(**VLLM_TEST_KNOBS)


def engine_and_native_greedy(policy, prompts, length):
    """``policy``'s greedy responses (``GenerationOutput``) to ``prompts`` from its rollout engine, then from its own
    transformers model (the engine detached for that call)."""
    from nemo_aligner.generation import SamplingParams

    greedy = SamplingParams(use_greedy=True)
    with policy.inference():
        engine_out = policy.generate(prompts, greedy, length)
    engine, policy._engine = policy._engine, None
    try:
        with policy.inference():
            native_out = policy.generate(prompts, greedy, length)
    finally:
        policy._engine = engine
    return engine_out, native_out
