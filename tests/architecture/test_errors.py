"""User errors versus bugs: the entry scripts print a :class:`~nemo_aligner.errors.UserError` as one ``error: ...``
line with exit status 2, and let every other exception (a bug) propagate with its traceback -- even a plain
``ValueError``, ``FileNotFoundError`` or ``ConnectionError``, which used to be swallowed as if it were the user's."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from omegaconf import OmegaConf

from tests.helpers import REPO, load_example_script
from nemo_aligner.data.jsonl import DataFormatError
from nemo_aligner.errors import (
    CannotListenError,
    MissingFileError,
    OutputExistsError,
    ServerUnavailableError,
    UnsupportedError,
    UserError,
)
from nemo_aligner.recipes.common import checkpoint_manager, run_or_exit
from nemo_aligner.utils.checkpoint import DamagedCheckpointError, NonFiniteError
from nemo_aligner.utils.config import ConfigKeyError, ConfigValueError

#: Every Hydra entry script and the function its ``main`` wraps with ``run_or_exit``.
HYDRA_SCRIPTS = [
    ("train_gpt_sft", "run"), ("train_gpt_dpo", "run"), ("train_reward_model", "run"),
    ("train_gpt_ppo_actor", "run"), ("train_gpt_rs_actor", "run"), ("train_gpt_self_rewarding", "run"),
    ("generate", "run"),
    ("serve_reward_model", "serve"), ("serve_ppo_critic", "serve"), ("serve_initial_policy", "serve"),
]


@pytest.mark.parametrize("cls, builtin", [
    (DataFormatError, ValueError), (ConfigKeyError, KeyError), (ConfigValueError, ValueError),
    (NonFiniteError, ValueError), (DamagedCheckpointError, ValueError), (MissingFileError, FileNotFoundError),
    (OutputExistsError, FileExistsError), (ServerUnavailableError, ConnectionError),
    (UnsupportedError, NotImplementedError), (CannotListenError, OSError),
])
def test_user_error_types_keep_their_builtin_base(cls, builtin):
    assert issubclass(cls, UserError) and issubclass(cls, builtin)


def test_os_error_subclasses_print_their_one_line_message():
    assert str(MissingFileError("reward_model.restore_from_path='x' is not an RM export directory")) == (
        "reward_model.restore_from_path='x' is not an RM export directory")


@pytest.mark.parametrize("bug", [ValueError, FileNotFoundError, FileExistsError, ConnectionError, OSError, KeyError])
@pytest.mark.parametrize("name, entry", HYDRA_SCRIPTS)
def test_entry_script_lets_a_bug_through(monkeypatch, name, entry, bug):
    """A plain built-in exception is a bug: ``main`` re-raises it (Python prints the traceback)."""
    script = load_example_script(name)

    def broken(*args, **kwargs):
        raise bug("internal bug: shapes [4, 7] and [4, 8] disagree")

    monkeypatch.setattr(script, entry, broken)
    with pytest.raises(bug, match="internal bug"):
        script.main(OmegaConf.create({}))  # Hydra's main calls the task function directly with a config


@pytest.mark.parametrize("error", [
    ConfigValueError("model.micro_batch_size=0: expected an integer >= 1"),
    MissingFileError("reward_model.restore_from_path=None is not an RM export directory"),
    ServerUnavailableError("server at http://127.0.0.1:5555 not ready after 1.0 s"),
    DataFormatError("prompts.jsonl", 3, "prompt", "expected a string"),
])
@pytest.mark.parametrize("name, entry", HYDRA_SCRIPTS)
def test_entry_script_prints_a_user_error_as_one_line(monkeypatch, capsys, name, entry, error):
    script = load_example_script(name)

    def mistaken(*args, **kwargs):
        raise error

    monkeypatch.setattr(script, entry, mistaken)
    with pytest.raises(SystemExit) as info:
        script.main(OmegaConf.create({}))
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {error}"]


def test_run_or_exit_passes_the_result_through():
    assert run_or_exit(lambda a, b: a + b, 2, 3) == 5


def test_log_dir_with_checkpoints_is_a_user_error(tmp_path):
    (tmp_path / "checkpoints" / "step=3").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step=3" / "meta.json").write_text('{"step": 3}')
    (tmp_path / "checkpoints" / "step=3" / "state.pt").mkdir()
    (tmp_path / "checkpoints" / "step=3" / "state.pt" / ".metadata").write_text("")
    exp = OmegaConf.create({"explicit_log_dir": str(tmp_path), "resume_if_exists": False,
                            "checkpoint_callback_params": {"save_top_k": 1, "monitor": "val_loss", "mode": "min"}})
    with pytest.raises(OutputExistsError, match="already holds checkpoints; set exp_manager.resume_if_exists=true"):
        checkpoint_manager(exp)


DRIVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from tests.helpers import load_example_script

    script = load_example_script("train_gpt_rs_actor")
    if sys.argv[1] == "bug":
        def broken(*args, **kwargs):
            raise ValueError("internal bug: rollout batch of 3 for 4 prompts")
        script.checkpoint_manager = broken  # runs after the config check, before any model loads
    sys.argv = [script.__file__] + sys.argv[2:]
    script.main()
""")


def _run_rs(tmp_path, mode: str, *overrides: str) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO)))
    return subprocess.run([sys.executable, str(driver), mode, f"exp_manager.explicit_log_dir={tmp_path / 'run'}",
                           "hydra.run.dir=.", "hydra.output_subdir=null", *overrides],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_command_line_bug_shows_a_traceback_and_user_error_one_line(tmp_path):
    bug = _run_rs(tmp_path, "bug")
    assert bug.returncode == 1, bug.stderr[-3000:]
    assert "Traceback (most recent call last)" in bug.stderr
    assert "ValueError: internal bug: rollout batch of 3 for 4 prompts" in bug.stderr
    assert "error: internal bug" not in bug.stderr

    mistake = _run_rs(tmp_path, "user", "+model.rs.num_rollout_samplez=4")  # Hydra adds it; the config check refuses it
    assert mistake.returncode == 2, mistake.stderr[-3000:]
    lines = mistake.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown config key 'model.rs.num_rollout_samplez'"), lines
    assert "Traceback" not in mistake.stderr
