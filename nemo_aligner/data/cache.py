"""The on-disk cache of tokenised data shared by the preference, SFT and reward-model datasets.

One data file is turned into rows once: :func:`build_cached_dataset` streams the rows a caller's function yields
into an Arrow dataset in a temporary directory under the cache, writes its counters to ``stats.json`` next to it,
and renames the directory into place under a key of the file and the settings only when it is complete (so an
error leaves nothing behind, and concurrent builders of the same key do not clash). Later calls with the same file
and settings memory-map the published directory instead of tokenising again.

Leftovers of a killed build (``.tmp-*`` directories under the cache) are removed by the next build in the same cache
(:func:`clean_stale_temporaries`). Each temporary directory records its owner (pid, host name, pid namespace) in
:data:`OWNER_FILE`. One is removed only when it is certainly abandoned: its owner ran on this host, in this pid
namespace, and that process no longer exists; or, for an owner elsewhere (or a directory without an owner record),
nothing in it has been modified for :data:`STALE_AFTER_S` seconds. A concurrent build's live directory is never
removed: its process exists, or (on another host) it keeps writing its rows into the directory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import datasets
import numpy as np

from nemo_aligner.data.jsonl import DataFormatError, iter_jsonl, require_data_file
from nemo_aligner.errors import DiskError, UserError
from nemo_aligner.utils.config import ConfigValueError
from nemo_aligner.utils.fs import disk_problem, make_readable

STATS_FILE = "stats.json"
"""Name of the counters file inside a cached dataset directory; its presence marks the directory complete."""

TOKENIZER_PROBE = "The quick brown fox. 123 \n\nHuman:"
"""Sentence whose token ids are part of :func:`tokenizer_fingerprint`."""

OWNER_FILE = "owner.json"
"""Name of the owner record (``pid``, ``host``, ``pid_namespace``) inside a temporary build directory."""

STALE_AFTER_S = 24 * 3600
"""A temporary build directory whose owner cannot be checked (another host, no owner record) is removed once
nothing in it has been modified for this many seconds."""

Rows = Callable[[int, int], Iterable["dict | None"]]
"""``rows(shard, num_shards)``: the rows of one shard of a file (see :func:`build_cached_dataset`)."""


def default_cache_dir() -> Path:
    """``$NEMO_ALIGNER_CACHE/data``, by default ``~/.cache/nemo_aligner/data``."""
    return Path(os.environ.get("NEMO_ALIGNER_CACHE", Path.home() / ".cache" / "nemo_aligner")).expanduser() / "data"


def tokenizer_fingerprint(tokenizer) -> dict:
    """What identifies a tokenizer's output for cache keys: name, vocabulary size, chat template, BOS/EOS ids and
    a hash of the ids of :data:`TOKENIZER_PROBE`."""
    probe_ids = list(tokenizer(TOKENIZER_PROBE)["input_ids"])
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "len": len(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "probe_sha256": hashlib.sha256(json.dumps(probe_ids).encode()).hexdigest(),
    }


def cache_key(path: Path, kind: str, key_parts: dict) -> str:
    """16 hex characters of a sha256 over ``kind``, the file's absolute path, size and mtime, and ``key_parts``
    (settings, tokenizer fingerprint, format version: anything that changes the rows)."""
    stat = path.stat()
    inputs = {"kind": kind, "path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **key_parts}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def iter_jsonl_shard(path: str | os.PathLike, shard: int, num_shards: int) -> Iterator[tuple[int, Any]]:
    """``(line_no, record)`` of the records of ``path`` with ``line_no % num_shards == shard`` (all of them when
    ``num_shards`` is 1); see :func:`~nemo_aligner.data.jsonl.iter_jsonl`."""
    for line_no, record in iter_jsonl(path):
        if line_no % num_shards == shard:
            yield line_no, record


def build_cached_dataset(
    path: str | os.PathLike,
    *,
    kind: str,
    dir_name: str,
    key_parts: dict,
    features: datasets.Features,
    rows: Rows,
    counters: Sequence[str],
    kept: str,
    empty_message: str,
    missing_message: str,
    extra_counts: Callable[[dict], dict] | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, dict]:
    """Build (once) and load the cached Arrow dataset of one data file.

    The dataset lives in ``<cache_dir>/<dir_name>`` where ``dir_name`` is a format string of ``stem`` (the file
    name up to its first dot) and ``key`` (:func:`cache_key` of ``kind`` and ``key_parts``), e.g.
    ``"{stem}-sft-{key}"``. When that directory has no :data:`STATS_FILE` yet, ``rows`` is run and its rows are
    written through a temporary directory under ``cache_dir`` that is renamed into place only once complete.

    ``rows(shard, num_shards)`` yields one item per example of the lines ``line_no % num_shards == shard`` (see
    :func:`iter_jsonl_shard`): a row dict with the ``features`` columns (``line_no`` among them) plus a
    ``truncated`` flag, or None for an example dropped as too long. It is called once as ``rows(0, 1)``, or with
    ``num_proc > 1`` once per shard in worker processes (then rows are put back in ``line_no`` order). It must be
    picklable for worker processes (e.g. a ``functools.partial`` of a module-level function).

    Counters (all in ``counters``, in that order in the stats): ``num_lines`` += 1 per item, ``num_dropped`` += 1
    per None, ``kept`` (e.g. ``"num_examples"``) += 1 per row, ``num_truncated`` += its flag, plus what
    ``extra_counts(row)`` returns.

    Args:
        path: the data file.
        kind: names the dataset kind in the cache key (``"preference"``, ``"sft"``, ``"reward"``).
        missing_message: the ``FileNotFoundError`` message, formatted with ``path``.
        empty_message: the ``ValueError`` message when no row is kept, formatted with ``path`` and the counters.
        cache_dir: default :func:`default_cache_dir`.
        num_proc: worker processes (None or 1: this process).

    Returns:
        ``(dataset, stats)``: the memory-mapped dataset and the counters plus ``path`` (the absolute file) and
        ``cache_path`` (the dataset directory), as also saved in its :data:`STATS_FILE`.

    Raises:
        FileNotFoundError: no such file, or a directory. DataFormatError: as raised by ``rows`` (the one at the lowest line when
            several workers fail); nothing is left in the cache. ValueError: no row kept.
        DiskError: the cache cannot be written (disk full, read-only, not writable:
            :func:`~nemo_aligner.utils.fs.disk_problem`); the message names ``cache_dir`` and ``model.data.cache_dir``.
    """
    path = Path(path).absolute()
    require_data_file(path, missing_message.format(path=path))
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final_dir = cache_root / dir_name.format(stem=path.name.split(".")[0], key=cache_key(path, kind, key_parts))
    if cache_root.is_dir():
        clean_stale_temporaries(cache_root)
    if not (final_dir / STATS_FILE).is_file():
        try:
            _build(cache_root, final_dir, path, rows, features, counters, kept, extra_counts, empty_message, num_proc)
        except UserError:
            raise
        except Exception as err:
            reason = disk_problem(err, cache_root)
            if reason is None:
                raise
            raise DiskError(f"cannot write the tokenised-data cache {cache_root}: {reason}. Free space there or make it "
                            "writable, or point model.data.cache_dir (or $NEMO_ALIGNER_CACHE) at another directory"
                            ) from err
    return load_cached_dataset(final_dir)


def _build(cache_root: Path, final_dir: Path, path: Path, rows: Rows, features: datasets.Features,
           counters: Sequence[str], kept: str, extra_counts: Callable[[dict], dict] | None, empty_message: str,
           num_proc: int | None) -> None:
    """Tokenise ``path`` into a temporary directory under ``cache_root`` and publish it as ``final_dir`` (see
    :func:`build_cached_dataset`); the temporary directory is removed whatever happens."""
    cache_root.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{final_dir.name}-", dir=cache_root))
    try:
        (work_dir / OWNER_FILE).write_text(json.dumps(_owner()))
        num_shards = max(1, num_proc or 1)
        try:
            dataset = _generate_dataset(rows, features, tuple(counters), kept, extra_counts, num_shards, work_dir, final_dir)
        except Exception:
            # datasets fails on a file without rows too: explain that with the counters
            _check_kept(_sum_shard_stats(work_dir, counters, num_shards), kept, empty_message, path)
            raise
        stats = _sum_shard_stats(work_dir, counters, num_shards)
        _check_kept(stats, kept, empty_message, path)
        if num_shards > 1:  # shards hold interleaved lines: restore file order
            line_numbers = np.asarray(dataset.with_format("numpy")["line_no"])
            dataset = dataset.select(np.argsort(line_numbers, kind="stable"))
        dataset.save_to_disk(str(work_dir / "dataset"))
        stats.update(path=str(path), cache_path=str(final_dir))
        (work_dir / "dataset" / STATS_FILE).write_text(json.dumps(stats, indent=2))
        make_readable(work_dir / "dataset")  # a shared cache: readable by other users under umask 022
        publish(work_dir / "dataset", final_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def build_tokenized_dataset(
    path: str | os.PathLike,
    tokenizer,
    generate_rows: Callable[..., Iterable["dict | None"]],
    settings: dict,
    format_version: int,
    **spec: Any,
) -> tuple[datasets.Dataset, dict]:
    """:func:`build_cached_dataset` of a data file that ``tokenizer`` tokenises (the preference, SFT and
    reward-model datasets).

    The cache key covers :func:`tokenizer_fingerprint`, ``format_version`` and ``settings`` (e.g.
    ``max_seq_length``, ``truncation``); the rows are ``generate_rows(shard, num_shards, path=<absolute path>,
    tokenizer=tokenizer, **settings)`` (a module-level function, so worker processes can run it).

    Args:
        spec: the other keyword arguments of :func:`build_cached_dataset` (``kind``, ``dir_name``, ``features``,
            ``counters``, ``kept``, messages, ``cache_dir``, ...).

    Raises:
        as :func:`build_cached_dataset`.
    """
    key_parts = {"tokenizer": tokenizer_fingerprint(tokenizer), "format_version": format_version, **settings}
    rows = functools.partial(generate_rows, path=Path(path).absolute(), tokenizer=tokenizer, **settings)
    return build_cached_dataset(path, key_parts=key_parts, rows=rows, **spec)


def concatenate_files(
    paths: Sequence[str | os.PathLike], build: Callable[[str | os.PathLike], tuple[datasets.Dataset, dict]], what: str
) -> tuple[datasets.Dataset, list[dict]]:
    """``build(path)`` for each file, concatenated in order: ``(dataset, per-file stats)`` (``line_no`` refers to
    each row's own file).

    Raises:
        ValueError: ``paths`` is empty (``"no {what} data files given"``); plus what ``build`` raises.
    """
    if not paths:
        raise ConfigValueError(f"no {what} data files given")
    built = [build(path) for path in paths]
    return datasets.concatenate_datasets([dataset for dataset, _ in built]), [stats for _, stats in built]

def _pid_namespace() -> str | None:
    """This process's pid namespace (``pid:[4026531836]`` on Linux), or None where it cannot be read."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _owner() -> dict:
    """The owner record of a temporary build directory made by this process."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "pid_namespace": _pid_namespace()}


def _pid_exists(pid: int) -> bool:
    """Whether a process ``pid`` exists here (one owned by another user counts as existing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _last_modified(directory: Path) -> float:
    """The newest modification time (seconds since the epoch) of ``directory`` and everything below it."""
    newest = directory.stat().st_mtime
    for parent, dirs, files in os.walk(directory):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(parent, name)).st_mtime)
            except OSError:  # removed meanwhile
                pass
    return newest


def _is_abandoned(directory: Path, now: float) -> bool:
    """The rule of the module docstring: owner on this host and pid namespace -> abandoned iff its process is gone;
    otherwise abandoned iff untouched for :data:`STALE_AFTER_S` seconds."""
    try:
        owner = json.loads((directory / OWNER_FILE).read_text())
    except (OSError, ValueError):
        owner = None
    if isinstance(owner, dict) and isinstance(owner.get("pid"), int):
        here = owner.get("host") == socket.gethostname() and owner.get("pid_namespace") == _pid_namespace()
        if here:
            return not _pid_exists(owner["pid"])
    try:
        return now - _last_modified(directory) > STALE_AFTER_S
    except OSError:  # removed meanwhile
        return False


def clean_stale_temporaries(cache_root: str | os.PathLike, now: float | None = None) -> list[Path]:
    """Remove the abandoned ``.tmp-*`` build directories directly under ``cache_root`` (left by a killed build;
    see the module docstring for the rule, which never removes a live build's directory). Returns what was removed.
    Directories that cannot be removed (e.g. another user's) are skipped."""
    now = time.time() if now is None else now
    removed = []
    for directory in sorted(Path(cache_root).glob(".tmp-*")):
        if directory.is_dir() and not directory.is_symlink() and _is_abandoned(directory, now):
            shutil.rmtree(directory, ignore_errors=True)
            if not directory.exists():
                removed.append(directory)
    return removed


def publish(built_dir: Path, final_dir: Path) -> None:
    """Atomically move a complete dataset directory into place (another process may have won the race)."""
    try:
        os.replace(built_dir, final_dir)
    except OSError:
        if not (final_dir / STATS_FILE).is_file():
            raise


def load_cached_dataset(final_dir: Path) -> tuple[datasets.Dataset, dict]:
    """Memory-map a published dataset directory: ``(dataset, stats)`` with ``stats["cache_path"]`` = ``final_dir``."""
    dataset = datasets.load_from_disk(str(final_dir))
    stats = json.loads((final_dir / STATS_FILE).read_text())
    stats["cache_path"] = str(final_dir)
    return dataset, stats


def _generate_dataset(rows, features, counters, kept, extra_counts, num_shards, work_dir, final_dir) -> datasets.Dataset:
    """Run ``rows`` through ``datasets.Dataset.from_generator`` into ``work_dir``; re-raise a data error as is."""
    try:
        return datasets.Dataset.from_generator(
            _count_rows,
            features=features,
            cache_dir=str(work_dir / "generator"),
            fingerprint=f"{final_dir.name}-{uuid.uuid4().hex}",
            num_proc=num_shards if num_shards > 1 else None,
            gen_kwargs={
                "shard_ids": list(range(num_shards)),  # the only list: datasets splits it among the workers
                "num_shards": num_shards,
                "rows": rows,
                "counters": counters,
                "kept": kept,
                "extra_counts": extra_counts,
                "stats_dir": str(work_dir),
            },
        )
    except Exception:  # datasets wraps (and, across processes, stringifies) errors raised by the generator
        data_error = _first_shard_error(work_dir)
        if data_error is not None:
            raise data_error from None
        raise


def _count_rows(shard_ids, num_shards, rows, counters, kept, extra_counts, stats_dir):
    """Yield the rows of the given shards, counting them; write ``shard-<id>.json`` (counters) when a shard is
    done or ``error-<id>.json`` for a malformed line, so the parent sees both even from a worker process."""
    for shard in shard_ids:
        counts = dict.fromkeys(counters, 0)
        try:
            for row in rows(shard, num_shards):
                counts["num_lines"] += 1
                if row is None:
                    counts["num_dropped"] += 1
                    continue
                counts[kept] += 1
                counts["num_truncated"] += int(row.pop("truncated"))
                for name, count in (extra_counts(row) if extra_counts else {}).items():
                    counts[name] += count
                yield row
        except DataFormatError as err:
            error = {"path": str(err.path), "line_no": err.line_no, "field": err.field, "message": err.message}
            (Path(stats_dir) / f"error-{shard}.json").write_text(json.dumps(error))
            raise
        (Path(stats_dir) / f"shard-{shard}.json").write_text(json.dumps(counts))


def _sum_shard_stats(work_dir: Path, counters: Sequence[str], num_shards: int) -> dict:
    """Add up the per-shard counters written by :func:`_count_rows` ({} if a shard did not finish)."""
    shard_files = [work_dir / f"shard-{shard}.json" for shard in range(num_shards)]
    if not all(shard_file.is_file() for shard_file in shard_files):
        return {}
    stats = dict.fromkeys(counters, 0)
    for shard_file in shard_files:
        for name, count in json.loads(shard_file.read_text()).items():
            stats[name] += count
    return stats


def _check_kept(stats: dict, kept: str, empty_message: str, path: Path) -> None:
    if stats and stats[kept] == 0:
        raise ConfigValueError(empty_message.format(path=path, **stats))


def _first_shard_error(work_dir: Path) -> DataFormatError | None:
    """The malformed line (lowest line number) recorded by the generator shards, if any."""
    errors = [json.loads(error_file.read_text()) for error_file in work_dir.glob("error-*.json")]
    if not errors:
        return None
    first = min(errors, key=lambda error: error["line_no"] or 0)  # None: an error of the whole file
    return DataFormatError(first["path"], first["line_no"], first["field"], first["message"])
