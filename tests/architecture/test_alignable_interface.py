"""The alignable interface: trainers in algorithms/ use only it, and its new methods behave."""

import ast
import contextlib
import re

import pytest
import torch
from omegaconf import OmegaConf

from nemo_aligner.algorithms.base import optimizer_step
from nemo_aligner.data.sequences import collate_sequences
from nemo_aligner.models.alignable import AlignableModel
from nemo_aligner.models.hf_causal_lm import entropy_from_logits

from tests.helpers import REPO

ALGORITHMS = REPO / "nemo_aligner" / "algorithms"
#: The other code that holds models: the servers, the recipes (wiring) and the entry scripts.
MODEL_USERS = sorted([*(REPO / "nemo_aligner" / "servers").glob("*.py"),
                      *(REPO / "nemo_aligner" / "recipes").glob("*.py"),
                      *(REPO / "examples" / "nlp" / "gpt").glob("*.py")])
#: Names of the objects that are (or hold) a model, for the servers' check: a ``getattr`` with a default on them, or
#: on their config, is a reach into a model; on anything else (a request, an exception, the app's state, a
#: duck-typed scorer's optional members) it is ordinary duck typing.
MODEL_NAMES = re.compile(r"\b(model|lm|policy|actor|critic|reference|module|config)\b")


def _private_reaches(source: str, getattr_objects: re.Pattern | None = None) -> list[str]:
    """``getattr(x, name, default)`` calls (only those whose ``x`` matches ``getattr_objects`` when it is given),
    and ``x._name`` / ``self.x._name`` accesses (``self._name`` and ``cls._name``, an object's own members, are
    allowed), in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr":
            if len(node.args) + len(node.keywords) > 2 and (
                    getattr_objects is None or getattr_objects.search(ast.unparse(node.args[0]))):
                found.append(f"line {node.lineno}: getattr with a default")
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            own = (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")) or (
                isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name)
                and node.value.func.id == "super")
            if not own:
                found.append(f"line {node.lineno}: .{node.attr} of {ast.unparse(node.value)}")
    return sorted(found)


def test_the_checker_finds_the_reaches_it_is_for():
    old = ('lm = getattr(model, "_lm", None)\npad = int(getattr(self.actor, "pad_token_id", 0))\n'
           'v = critic._lm.config.vocab_size\nids = self.actor._eos_token_ids()\nx = self._counters()\n')
    assert _private_reaches(old) == ["line 1: getattr with a default", "line 2: getattr with a default",
                                     "line 3: ._lm of critic", "line 4: ._eos_token_ids of self.actor"]


def test_the_servers_check_tells_model_reaches_from_duck_typing():
    old = ('name = getattr(critic, "source", "")\nsrc = getattr(lm.config, "name_or_path", "")\n'
           'headers = getattr(exc, "headers", None)\ntok = getattr(scorer, "tokenizer", None)\n'
           'inner = getattr(getattr(scorer, "model", None), "model", None)\n')
    assert _private_reaches(old, MODEL_NAMES) == ["line 1: getattr with a default", "line 2: getattr with a default",
                                                  "line 5: getattr with a default"]


@pytest.mark.parametrize("path", sorted(ALGORITHMS.glob("*.py")), ids=lambda p: p.name)
def test_no_algorithm_reaches_past_the_alignable_interface(path):
    assert _private_reaches(path.read_text()) == [], path


@pytest.mark.parametrize("path", MODEL_USERS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_servers_recipes_and_entry_scripts_use_only_public_model_members(path):
    """No private member of another object anywhere; no ``getattr`` with a default reaching into a model (any
    ``getattr`` with a default in recipes and entry scripts; in servers, one on a model or its config)."""
    servers = path.parent.name == "servers"
    assert _private_reaches(path.read_text(), MODEL_NAMES if servers else None) == [], path


# ---- the interface's defaults ---------------------------------------------------------------------------------
class _Bare(AlignableModel):
    """Implements only the abstract methods: everything optional must fail loudly, never default silently."""

    device, data_parallel_rank, data_parallel_size = torch.device("cpu"), 0, 1

    def __init__(self):
        self.param = torch.nn.Parameter(torch.tensor(1.0))
        self.backward_losses, self.calls = [], []

    def prepare_for_training_step(self):
        self.calls.append("prepare")

    def accumulate(self, is_last):
        self.calls.append(("accumulate", is_last))
        return contextlib.nullcontext()

    def backward(self, loss):
        self.backward_losses.append(loss)

    def finish_training_step(self):
        self.calls.append("finish")
        return {"grad_norm": 0.5, "lr": 0.1}

    def prepare_for_inference(self):
        pass

    def finish_inference(self):
        pass

    def all_reduce(self, tensor, op="mean"):
        return tensor

    def save_checkpoint(self, path, extra_state):
        pass

    def load_checkpoint(self, path):
        return {}

    def export_hf(self, path):
        pass


def test_a_model_without_a_tokenizer_has_no_pad_id_vocabulary_or_decode():
    model = _Bare()
    with pytest.raises(NotImplementedError, match="_Bare has no pad token id"):
        model.pad_token_id
    with pytest.raises(NotImplementedError, match="_Bare has no vocabulary size"):
        model.vocab_size
    with pytest.raises(NotImplementedError, match="_Bare cannot decode"):
        model.decode([1, 2])
    with pytest.raises(NotImplementedError, match="_Bare does not produce token log-probabilities"):
        model.get_logprobs(None, return_entropy=True)
    assert model.tokenizer is None and model.eos_token_ids() == []


# ---- optimizer_step -------------------------------------------------------------------------------------------
def test_optimizer_step_weights_losses_and_metrics_explicitly():
    model = _Bare()
    losses = {"a": 2.0, "b": 4.0, "c": 10.0}

    def loss_fn(name):
        loss = model.param * losses[name]
        return loss, {"loss": loss.detach(), "tokens": {"a": 1, "b": 1, "c": 2}[name]}

    sums, info = optimizer_step(model, ["a", "b", "c"], loss_fn, [1.0, 1.0, 2.0], 4.0)
    assert [float(x) for x in model.backward_losses] == [2.0 / 4, 4.0 / 4, 10.0 * 2 / 4]
    assert sums == {"loss": pytest.approx((2 + 4 + 20) / 4), "tokens": pytest.approx((1 + 1 + 4) / 4)}
    assert info == {"grad_norm": 0.5, "lr": 0.1}
    assert model.calls == ["prepare", ("accumulate", False), ("accumulate", False), ("accumulate", True), "finish"]
    with pytest.raises(ValueError, match="3 micro-batches but 2 loss weights"):
        optimizer_step(model, ["a", "b", "c"], loss_fn, [1.0, 1.0])


def test_optimizer_step_mean_weighting_is_bitwise_the_division_by_the_count():
    """``weights = 1, denominator = n`` gives the bits of ``loss / n`` (what the trainers wrote before)."""
    model = _Bare()
    values = [0.1, 0.7, 1 / 3]
    sums, _ = optimizer_step(model, [0, 1, 2], lambda i: (torch.tensor(values[i]), {"loss": values[i]}), [1.0] * 3, 3)
    assert [float(x) for x in model.backward_losses] == [float(torch.tensor(v) / 3) for v in values]
    assert sums["loss"] == values[0] / 3 + values[1] / 3 + values[2] / 3


# ---- the HF backend -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fabric():
    from nemo_aligner.utils.runtime import build_fabric

    return build_fabric(OmegaConf.create({"accelerator": "cpu", "devices": 1}), seed=3)


def test_hf_policy_interface(fabric, tiny_model_dir, tokenizer):
    from nemo_aligner.models.hf_causal_lm import HFCausalLM

    cfg = OmegaConf.create({"optim": {"name": "adamw", "lr": 1e-3, "sched": {}}, "peft": {"peft_scheme": "none"}})
    policy = HFCausalLM(fabric, cfg, str(tiny_model_dir), max_steps=1)
    assert policy.pad_token_id == tokenizer.pad_token_id == 0
    assert policy.vocab_size == len(tokenizer)
    ids = tokenizer("Human: tea? Assistant: yes", add_special_tokens=False)["input_ids"] + [2]
    assert policy.decode(ids) == "Human: tea? Assistant: yes</s>"
    assert policy.eos_token_ids() == [2]
    assert policy.tokenizer is not None

    batch = collate_sequences([{"input_ids": ids, "prompt_length": 4}, {"input_ids": ids[:6], "prompt_length": 2}],
                              policy.pad_token_id)
    policy.prepare_for_training_step()
    logprobs, entropy = policy.get_logprobs(batch, return_entropy=True)
    assert torch.equal(logprobs, policy.get_logprobs(batch))
    # by hand: the full logits of the wrapped model at the positions predicting each target
    with torch.no_grad():
        hf = policy._lm
        expected = []
        for row in range(batch.input_ids.shape[0]):
            logits = hf(input_ids=batch.input_ids[row : row + 1]).logits[0]
            sel = batch.pred_row == row
            expected.append(entropy_from_logits(logits[batch.pred_col[sel]]))
    assert entropy.shape == logprobs.shape
    assert torch.allclose(entropy, torch.cat(expected), atol=1e-5)
    assert bool((entropy > 0).all()) and bool((entropy <= torch.log(torch.tensor(float(len(tokenizer))))).all())
    entropy.sum().backward()  # differentiable: the entropy bonus trains the policy
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.module.parameters())
    ref_logprobs, ref_entropy = policy.get_logprobs(batch, reference=True, return_entropy=True)
    assert torch.allclose(ref_logprobs, logprobs.detach()) and torch.allclose(ref_entropy, entropy.detach())


def test_hf_critic_vocab_size_and_pad_id(fabric, tiny_model_dir, tokenizer):
    from nemo_aligner.models.critic import HFCritic

    critic = HFCritic(fabric, OmegaConf.create({"optim": {"name": "adamw", "lr": 1e-3}}), str(tiny_model_dir),
                      max_steps=1)
    assert critic.vocab_size == len(tokenizer) and critic.pad_token_id == 0
