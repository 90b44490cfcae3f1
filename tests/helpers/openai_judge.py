"""A fake OpenAI-compatible judge server on loopback (uvicorn in a thread): ``/v1/chat/completions`` answers with
``answer(content, payload) -> str`` and records every request's payload and headers."""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable

import uvicorn
from fastapi import FastAPI, Request


class FakeJudgeServer:
    """``with FakeJudgeServer(answer) as server:`` serves at ``server.base_url`` (``http://127.0.0.1:<port>/v1``);
    ``server.requests`` holds ``(payload, headers)`` per request, in arrival order."""

    def __init__(self, answer: Callable[[str, dict], str]):
        self.answer = answer
        self.requests: list[tuple[dict, dict]] = []
        self._lock = threading.Lock()
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def complete(request: Request):
            payload = await request.json()
            with self._lock:
                self.requests.append((payload, dict(request.headers)))
            content = self.answer(payload["messages"][-1]["content"], payload)
            return {"id": "x", "object": "chat.completion", "model": payload["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop"}]}

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> "FakeJudgeServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the fake judge server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
