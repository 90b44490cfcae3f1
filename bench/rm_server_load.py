"""Load test of the reward-model server: throughput and latency with dynamic batching on and off.

    python bench/rm_server_load.py                                  # tiny random RM, 16 clients, 320 requests
    flock /tmp/smollm2.lock python bench/rm_server_load.py --model results/rm_quickstart/hf_export --requests 96

For each setting (``--batched-mbs``, default 8, then 1 = batching off) a server process is started on a free
127.0.0.1 port, ``--clients`` threads each send their share of ``--requests`` single-pair ``/score`` requests back
to back (bounded in count and by ``--max-seconds``), and requests/s, p50 and p99 latency are printed, then the
on/off throughput ratio. Traffic goes to 127.0.0.1 only.

On a small CPU the model's forward is compute-bound (a batch of 8 costs nearly 8 single forwards), so batching gains
little there; ``--fixed-cost-ms 20`` adds a fixed cost per forward pass, as on a GPU, to show what batching buys
when the forward's latency barely depends on the batch size.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PAIRS = [
    ("Human: How do I bake bread?", "Mix flour, water, yeast and salt, then bake it for forty minutes."),
    ("What is two plus two?", "Two plus two is four, the same as two times two."),
    ("Tell me something rude.", "I would rather not be rude; can I help with something else?"),
    ("Describe a fox.", "The quick brown fox jumps over the lazy dog 0123456789."),
]


def build_tiny_rm(path: Path, layers: int = 2, hidden: int = 64) -> None:
    """A random Llama reward model (``layers`` x ``hidden``) with the tests' tiny tokenizer, saved to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    sys.path.insert(0, str(REPO))
    from tests.helpers import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        num_hidden_layers=layers, hidden_size=hidden, intermediate_size=3 * hidden, num_attention_heads=max(1, hidden // 32),
        num_key_value_heads=max(1, hidden // 64),
        vocab_size=len(tokenizer), max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        num_labels=1,
    )
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)


class FixedCostScorer:
    """Wraps a scorer and sleeps ``fixed_cost_ms`` per ``score`` call (per forward pass), whatever its size.

    This models an accelerator, where a forward's latency hardly grows with the batch size, on a CPU-only
    machine. The sleep releases the GIL and uses no CPU.
    """

    def __init__(self, scorer, fixed_cost_ms: float):
        self.inner, self.fixed_cost_ms = scorer, fixed_cost_ms

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score(self, sequences, micro_batch_size=None):
        time.sleep(self.fixed_cost_ms / 1000.0)
        return self.inner.score(sequences, micro_batch_size=micro_batch_size)


def _serve(model: str, micro_batch_size: int, max_wait_ms: float, threads: int, fixed_cost_ms: float, ready) -> None:
    import torch

    from nemo_aligner.models.reward_model import RewardScorer
    from nemo_aligner.servers.app import run_server
    from nemo_aligner.servers.reward_model_server import build_reward_model_app

    torch.set_num_threads(threads)
    scorer = RewardScorer.from_pretrained(model, micro_batch_size=micro_batch_size)
    if fixed_cost_ms > 0:
        scorer = FixedCostScorer(scorer, fixed_cost_ms)
    app = build_reward_model_app(scorer, micro_batch_size=micro_batch_size, max_wait_ms=max_wait_ms, api_token=None)
    run_server(app, host="127.0.0.1", port=0, on_ready=ready.put)


def run_load(url: str, clients: int, requests: int, max_seconds: float) -> dict:
    """``clients`` threads send ``requests`` single-pair requests in total; latency in ms, throughput in req/s."""
    from nemo_aligner.servers.client import RewardModelClient

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds
    per_client = [requests // clients + (1 if c < requests % clients else 0) for c in range(clients)]
    barrier = threading.Barrier(clients + 1, timeout=60)

    def worker(c: int) -> None:
        with RewardModelClient(url, api_token="", timeout=60, max_retries=0) as client:
            warm_prompt, warm_response = PAIRS[c % len(PAIRS)]
            client.score([warm_prompt], [warm_response])  # warm-up, not timed
            barrier.wait()
            for k in range(per_client[c]):
                if time.monotonic() > deadline:
                    return
                prompt, response = PAIRS[(c + k) % len(PAIRS)]
                start = time.perf_counter()
                try:
                    client.score([prompt], [response])
                except Exception as err:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(repr(err))
                    continue
                with lock:
                    latencies.append((time.perf_counter() - start) * 1000.0)

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(clients)]
    for th in threads:
        th.start()
    barrier.wait()
    start = time.perf_counter()
    for th in threads:
        th.join(max_seconds + 60)
    elapsed = time.perf_counter() - start
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")  # noqa
    with RewardModelClient(url, api_token="", timeout=30, max_retries=0) as client:
        counters = client.info()["counters"]
    warmup = clients  # one untimed request per client (included in the server's counters)
    return {
        "requests_ok": len(latencies),
        "errors": len(errors),
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": pick(0.99),
        "micro_batches": counters["micro_batches"],
        "mean_micro_batch": counters["items"] / max(1, counters["micro_batches"]),
        "warmup_requests": warmup,
    }


def bench_setting(model: str, micro_batch_size: int, args) -> dict:
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    proc = ctx.Process(
        target=_serve, args=(model, micro_batch_size, args.max_wait_ms, args.server_threads, args.fixed_cost_ms, ready), daemon=True
    )
    proc.start()
    try:
        url = ready.get(timeout=300)
        result = run_load(url, args.clients, args.requests, args.max_seconds)
    finally:
        proc.terminate()
        proc.join(30)
    return {"micro_batch_size": micro_batch_size, **result}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="reward-model export dir (default: a tiny random RM)")
    parser.add_argument("--tiny-layers", type=int, default=2, help="layers of the default tiny RM")
    parser.add_argument("--tiny-hidden", type=int, default=64, help="hidden size of the default tiny RM")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=320, help="total requests per setting")
    parser.add_argument("--batched-mbs", type=int, default=8, help="micro_batch_size with batching on")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--max-seconds", type=float, default=120.0, help="stop sending after this long per setting")
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads in the server process")
    parser.add_argument("--fixed-cost-ms", type=float, default=0.0,
                        help="add this many ms per forward pass (models an accelerator; see FixedCostScorer)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = str(Path(tmp) / "tiny_rm")
            build_tiny_rm(Path(model), args.tiny_layers, args.tiny_hidden)
        rows = [bench_setting(model, mbs, args) for mbs in (args.batched_mbs, 1)]
    tiny = f"tiny random RM ({args.tiny_layers} layers, hidden {args.tiny_hidden})"
    extra = f" + {args.fixed_cost_ms} ms per forward" if args.fixed_cost_ms > 0 else ""
    print(f"model: {args.model or tiny}{extra}; {args.clients} clients, server torch threads {args.server_threads}, "
          f"{args.requests} requests of one pair each, max_wait_ms={args.max_wait_ms}")
    print(f"{'micro_batch_size':>16} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'batches':>8} {'mean mb':>8} {'errors':>6}")
    for r in rows:
        print(f"{r['micro_batch_size']:>16} {r['requests_per_s']:>8.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
              f"{r['micro_batches']:>8} {r['mean_micro_batch']:>8.2f} {r['errors']:>6}")
    ratio = rows[0]["requests_per_s"] / rows[1]["requests_per_s"]
    print(f"throughput ratio batching on/off: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratio": ratio}, indent=2))
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
