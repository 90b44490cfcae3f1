"""What several test files share, in one place: every test imports these from ``tests.helpers`` (never from another
test module, nor from ``conftest.py``, which only turns some of them into fixtures).

``paths``       :data:`REPO` (the repository root) and :data:`SHARED_DATA` (the shared HH-RLHF copy)
``tokenizers``  :func:`build_tokenizer` (the tiny BPE tokenizer with a chat template), :func:`build_chatml_tokenizer`
``models``      :func:`build_tiny_model` (2-layer random GPT-2 / Llama), :func:`save_tiny_reward_model`
``scripts``     :func:`load_example_script` (an entry script of ``examples/nlp/gpt/`` as a module)
``config``      :func:`compose_config` (a ``conf/*.yaml`` composed by Hydra, as the entry scripts do)
``fakes``       :class:`FakePolicy`, :class:`EnginePolicy` and :func:`step_responses_by_global_index`
``dpo``         :func:`write_pairs` and :func:`dpo_cfg` (the DPO recipe on a tiny model)
``sft``         :func:`encode_sft_record` (an SFT record as the SFT reader tokenises it)
``vllm``        :data:`VLLM_TEST_KNOBS`, :func:`vllm_overrides`, :func:`vllm_test_config` (one engine per session),
                :func:`engine_and_native_greedy`
``self_rewarding`` :func:`write_prompts_with_answers`, :func:`sr_cfg`, :func:`response_score` and
                :class:`ScriptedJudge` (the self-rewarding recipe on a tiny model)
``faults``      :class:`RayTrainWorkerKiller` (SIGKILL a Ray Train worker once a file exists)
``openai_judge`` :class:`FakeJudgeServer` (an OpenAI-compatible judge endpoint on loopback)
``ppo``         :func:`write_prompts`, :func:`ppo_cfg`, :data:`LEARNING_OVERRIDES`, :class:`Killed` and
                :func:`checkpoint_model_state` (the PPO recipe on tiny models); :func:`ppo_command`, :func:`run_ppo_ranks`,
                :func:`csv_column` (multi-rank runs and their CSV logs)
"""

from tests.helpers.config import compose_config
from tests.helpers.dpo import dpo_cfg, write_pairs
from tests.helpers.fakes import EnginePolicy, FakePolicy, step_responses_by_global_index
from tests.helpers.faults import RayTrainWorkerKiller
from tests.helpers.models import build_tiny_model, save_tiny_reward_model
from tests.helpers.openai_judge import FakeJudgeServer
from tests.helpers.paths import REPO, SHARED_DATA
from tests.helpers.ppo import (
    LEARNING_OVERRIDES,
    Killed,
    checkpoint_model_state,
    csv_column,
    ppo_cfg,
    ppo_command,
    run_ppo_ranks,
    write_prompts,
)
from tests.helpers.scripts import load_example_script
from tests.helpers.self_rewarding import ScriptedJudge, response_score, sr_cfg, write_prompts_with_answers
from tests.helpers.sft import encode_sft_record
from tests.helpers.vllm import VLLM_TEST_KNOBS, engine_and_native_greedy, vllm_overrides, vllm_test_config
from tests.helpers.tokenizers import CHAT_TEMPLATE, CHATML_TEMPLATE, CORPUS, build_chatml_tokenizer, build_tokenizer

__all__ = [
    "CHATML_TEMPLATE", "CHAT_TEMPLATE", "CORPUS", "LEARNING_OVERRIDES", "REPO", "SHARED_DATA", "EnginePolicy",
    "FakePolicy", "Killed", "build_chatml_tokenizer", "build_tiny_model", "build_tokenizer", "checkpoint_model_state",
    "compose_config", "dpo_cfg", "encode_sft_record", "load_example_script", "ppo_cfg",
    "step_responses_by_global_index", "write_pairs", "write_prompts", "VLLM_TEST_KNOBS", "vllm_overrides",
    "vllm_test_config", "ScriptedJudge", "response_score", "sr_cfg", "write_prompts_with_answers", "FakeJudgeServer",
    "save_tiny_reward_model", "csv_column", "RayTrainWorkerKiller", "ppo_command", "run_ppo_ranks", "engine_and_native_greedy",
]
