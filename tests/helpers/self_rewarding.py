"""The self-rewarding recipe on a tiny model: a prompt file with answers, the composed ``gpt_self_rewarding``
config, and :class:`ScriptedJudge`, a deterministic test engine in front of the policy's ``generate``."""

from __future__ import annotations

import json
from pathlib import Path

from nemo_aligner.generation import GenerationOutput

from tests.helpers.config import compose_config

TOPICS = ["bread", "tea", "rain", "maps", "owls", "jazz", "kites", "salt"]
#: The tests' judge templates: short, and easy for :class:`ScriptedJudge` to read back.
JUDGE_TEMPLATE = "JUDGE {{ response }}"
META_TEMPLATE = "META {{ judgement_a }} VS {{ judgement_b }}"


def write_prompts_with_answers(path: Path, n: int = 16) -> Path:
    """``n`` SFT pairs ``{"prompt": "Human: Tell me about <topic> <i>. Assistant:", "response": " <topic> is nice."}``."""
    with open(path, "w") as f:
        for i in range(n):
            topic = TOPICS[i % len(TOPICS)]
            f.write(json.dumps({"prompt": f"Human: Tell me about {topic} {i}. Assistant:",
                                "response": f" {topic} is nice."}) + "\n")
    return path


def response_score(text: str) -> int:
    """The scripted judge's verdict on a response: the number of ``e`` characters in its text, at most 5."""
    return min(5, text.count("e"))


def sr_cfg(tmp_path, model_dir, prompts, *overrides, run="run"):
    """``conf/gpt_self_rewarding.yaml`` composed for a tiny CPU run on ``model_dir``: ``prompts`` for training and
    validation, 4 prompts x 4 responses of at most 6 tokens per step, 1 judgement each, the scripted judge's
    templates, unconstrained judging, logs in ``tmp_path / run``; ``overrides`` come last and win."""
    cfg = compose_config("gpt_self_rewarding", [
        f"pretrained_checkpoint.restore_from_path={model_dir}",
        f"model.data.train_ds.file_path=[{prompts}]",
        f"model.data.validation_ds.file_path=[{prompts}]",
        f"exp_manager.explicit_log_dir={tmp_path / run}",
        "trainer.accelerator=cpu",
        "model.encoder_seq_length=64",
        "model.global_batch_size=4", "model.micro_batch_size=2",
        "model.spin.num_responses_to_gen=4", "model.spin.num_evals_to_average=1",
        "model.spin.rollout_micro_batch_size=8",
        "model.spin.length_params.max_length=6", "model.spin.judge_max_length=12",
        "model.spin.constrain_judge_output=false",
        "model.optim.lr=1e-2", "model.optim.sched.min_lr=1e-2",
        "trainer.self_rewarding.val_check_interval=0", "trainer.self_rewarding.save_interval=1",
        *overrides,
    ])
    cfg.model.spin.llm_judge_prompt = JUDGE_TEMPLATE
    cfg.model.spin.llm_meta_judge_prompt = META_TEMPLATE
    return cfg


class ScriptedJudge:
    """A policy whose ``generate`` is scripted for judge requests and real otherwise (every other member is the
    wrapped policy's).

    * ``JUDGE <response>`` requests: ``"Reason r<e>. Score: <s>"`` with ``s = response_score(response) + e`` capped
      at 5 when ``vary_by_seed`` (``e`` = the row seed's parity), else ``+ 0``.
    * ``META <a> VS <b>`` requests: ``"Winner: Judgement A"`` when ``a`` holds ``r0``, else ``B``.
    * other prompts: the real policy's responses, all marked ended (the tiny random model almost never samples EOS).

    ``responses`` records ``(prompt_ids, response_ids)`` of the real generations, in call order.
    """

    def __init__(self, policy, vary_by_seed: bool = False):
        self._policy = policy
        self._vary = vary_by_seed
        self.responses: list[tuple[list[int], list[int]]] = []

    def __getattr__(self, name):
        return getattr(self._policy, name)

    def _reply(self, text: str) -> list[int]:
        return self._policy.tokenizer(text, add_special_tokens=False)["input_ids"] + [self._policy.tokenizer.eos_token_id]

    def _request(self, ids) -> str:
        """The user text of a chat-template request (the tiny template's ``<|user|>...</s><|assistant|>``)."""
        text = self._policy.tokenizer.decode(ids)
        for marker in ("<s>", "<|user|>"):
            text = text[text.find(marker) + len(marker):] if marker in text else text
        return text.split("</s><|assistant|>")[0]

    def generate(self, prompt_ids, sampling_params, length_params, seed=None, seeds=None):
        texts = [self._request(p) for p in prompt_ids]
        if all(t.startswith("JUDGE ") for t in texts):
            out = []
            for text, row_seed in zip(texts, seeds):
                e = int(row_seed) % 2 if self._vary else 0
                out.append(self._reply(f"Reason r{e}. Score: {min(5, response_score(text[len('JUDGE '):]) + e)}"))
            return GenerationOutput(out, [True] * len(out))
        if all(t.startswith("META ") for t in texts):
            out = [self._reply("Winner: Judgement " + ("A" if "r0" in t.split(" VS ")[0] else "B")) for t in texts]
            return GenerationOutput(out, [True] * len(out))
        result = self._policy.generate(prompt_ids, sampling_params, length_params, seed=seed, seeds=seeds)
        self.responses += list(zip([list(p) for p in prompt_ids], [list(r) for r in result.response_ids]))
        return GenerationOutput(result.response_ids, [True] * len(result.response_ids))
