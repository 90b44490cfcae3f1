"""The errors that are the user's mistake, and nothing else.

Every error a user can fix by changing a config key, a data file, a path or a command line is a :class:`UserError`.
The entry scripts (``examples/nlp/gpt/*.py``, through :func:`nemo_aligner.recipes.common.run_or_exit`) catch only
this class and print its message as one ``error: <message>`` line with exit status 2; any other exception is a bug
and keeps its traceback. So raise a :class:`UserError` subclass exactly when the message alone tells the user what
to change, and a plain built-in error (``ValueError``, ``RuntimeError``, ...) for a broken invariant.

This module is the bottom floor of the package: it imports nothing from ``nemo_aligner`` and every module may
import it. The user-error types of the other floors subclass :class:`UserError` where they are defined:

* :class:`nemo_aligner.data.jsonl.DataFormatError`: a malformed record (``file:line: field '...': ...``);
* :class:`nemo_aligner.utils.config.ConfigKeyError` / :class:`~nemo_aligner.utils.config.ConfigValueError`: an
  unknown config key, a config value out of range;
* :class:`nemo_aligner.utils.checkpoint.NonFiniteError` / :class:`~nemo_aligner.utils.checkpoint.DamagedCheckpointError`:
  training diverged, a checkpoint cannot be resumed.

Each keeps its built-in base too (``ValueError``, ``KeyError``, ...) so that callers that caught the built-in
still do.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (a config key or value, a data file, a path, a server address); its message says
    what is wrong and what to change, in one line. Entry scripts print it without a traceback and exit with 2."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named (a model, an RM export, a checkpoint, a config) does not exist or is
    not what it should be; the message names the path and the config key that set it."""


class OutputExistsError(UserError, FileExistsError):
    """An output the run would write already exists (a log directory holding checkpoints, a generation output
    file); the message says which key continues or redirects the run."""


class ServerUnavailableError(UserError, ConnectionError):
    """A server the run was told to use (reward model, critic, initial policy) does not answer; the message names
    its URL and how long the run waited."""


class UnsupportedError(UserError, NotImplementedError):
    """A combination of settings the library does not support (e.g. generation under FSDP); the message names the
    key and the supported alternative."""


class CannotListenError(UserError, OSError):
    """A server cannot listen on the host and port it was given (in use, not this machine's address, a privileged
    port); the message names ``host:port`` and the operating system's reason."""


class MissingDependencyError(UserError, ImportError):
    """An optional package a setting asks for (e.g. vLLM for ``trainer.<algo>.vllm.enable=true``) is not installed;
    the message names the key and the install command."""


class DiskError(UserError, OSError):
    """A write failed because of the disk, not the data: no space left (``ENOSPC``), a quota (``EDQUOT``), a
    read-only file system (``EROFS``) or a directory the process may not write (``EACCES``); the message names the
    path, the reason and what to do (free space, make it writable, or the config key that points elsewhere)."""
