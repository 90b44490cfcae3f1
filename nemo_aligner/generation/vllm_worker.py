"""The code that runs inside vLLM's worker processes (``worker_extension_cls`` of
:class:`nemo_aligner.generation.vllm_engine.VLLMEngine`): the receiving end of the weight refit.

It imports nothing from ``nemo_aligner`` (the workers import this module by its dotted name) and only uses the
worker's own ``reload_weights``.
"""

from __future__ import annotations


class RefitWorkerExtension:
    """Mixed into each vLLM worker: ``nemo_aligner_refit(path)`` loads the tensors of a safetensors file (Hugging
    Face parameter names, checkpoint layout) into the running model through the worker's ``reload_weights`` (``model_runner.reload_weights`` under the worker's vLLM config), which
    maps them onto vLLM's fused layers (``qkv_proj``, ``gate_up_proj``) and redoes the backend's weight processing
    (the CPU backend repacks linear weights, so a plain ``load_weights`` after start-up would not do)."""

    def nemo_aligner_refit(self, path: str) -> int:
        """Load the weights in ``path``; returns how many tensors were read."""
        from safetensors import safe_open

        count = [0]

        def weights():
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    count[0] += 1
                    yield name, f.get_tensor(name)

        self.reload_weights(weights_iterator=weights())
        return count[0]
