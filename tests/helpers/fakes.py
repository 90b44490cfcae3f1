"""Stand-ins for a policy behind the alignable interface: :class:`FakePolicy` records every call the trainer
makes, :class:`EnginePolicy` generates with the real engine on a simulated data-parallel rank."""

from __future__ import annotations

import contextlib

import torch

from nemo_aligner.generation import GenerationOutput
from nemo_aligner.models.alignable import AlignableModel


class FakePolicy(AlignableModel):
    """Responses are a deterministic function of (seed, row); log-prob of every target is a shared parameter."""

    pad_token_id = 0

    def __init__(self):
        self.weight = torch.nn.Parameter(torch.tensor(-1.0))
        self.calls: list[tuple] = []
        self.batches = []
        self.losses: list[float] = []
        self.in_inference = False

    def prepare_for_training_step(self):
        self.calls.append(("prepare",))

    @contextlib.contextmanager
    def accumulate(self, is_last):
        self.calls.append(("accumulate", is_last))
        yield

    def get_logprobs(self, batch, reference=False):
        assert not reference and not self.in_inference
        self.batches.append(batch)
        return self.weight.expand(batch.targets.numel()) * 1.0

    def generate(self, prompt_ids, sampling_params, length_params, seed=None, seeds=None):
        assert self.in_inference
        self.calls.append(("generate", len(prompt_ids), sampling_params.use_greedy))
        seeds = seeds if seeds is not None else [seed or 0] * len(prompt_ids)
        responses = [[10 + (7 * seeds[row] + 3 * row) % 40] * (1 + row % 3) for row in range(len(prompt_ids))]
        return GenerationOutput(responses, [True] * len(prompt_ids))

    def backward(self, loss):
        self.losses.append(float(loss))
        loss.backward()

    def finish_training_step(self):
        self.calls.append(("finish",))
        self.weight.grad = None
        return {"grad_norm": 1.0, "lr": 0.1}

    def prepare_for_inference(self):
        self.in_inference = True

    def finish_inference(self):
        self.in_inference = False

    device = torch.device("cpu")
    data_parallel_rank = 0
    data_parallel_size = 1

    def all_reduce(self, tensor, op="mean"):
        return tensor

    def save_checkpoint(self, path, extra_state):
        raise AssertionError("not used")

    def load_checkpoint(self, path):
        raise AssertionError("not used")

    def export_hf(self, path):
        raise AssertionError("not used")


class EnginePolicy(FakePolicy):
    """:class:`FakePolicy` on a simulated data-parallel rank whose ``generate`` samples from a tiny Llama with the
    real engine (``seed`` seeds a ``torch.Generator`` and ``seeds`` are per-row, as in ``HFCausalLM.generate``);
    every response is recorded in generation order."""

    def __init__(self, lm, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.lm = lm
        self.data_parallel_rank, self.data_parallel_size = rank, world_size
        self.generated: list[list[int]] = []

    def generate(self, prompt_ids, sampling_params, length_params, seed=None, seeds=None):
        from nemo_aligner.generation import generate

        assert self.in_inference
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None and seeds is None else None
        out = generate(self.lm, prompt_ids, sampling_params, length_params, eos_token_ids=[2], pad_token_id=0,
                       generator=generator, seeds=seeds)
        self.generated += out.response_ids
        return out


def step_responses_by_global_index(policy: EnginePolicy, trainer, num_per_prompt: int) -> dict[tuple[int, int], list]:
    """``{(dataset index, sample index): response}`` of the responses ``policy`` generated for step 0 (rollouts
    are prompt-major over the rank's sampler indices)."""
    indices = [i for mb in trainer.sampler.micro_batches(0) for i in mb]
    keys = [(i, j) for i in indices for j in range(num_per_prompt)]
    assert len(policy.generated) == len(keys)
    return dict(zip(keys, policy.generated))
