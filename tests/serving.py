"""A real server for the serving tests: uvicorn on a free localhost port, in a thread,
over an engine the test can also look at."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import openai
import uvicorn

from mixtral_jax.inference.engine import Engine
from mixtral_jax.inference.server import create_app

NAME = "mixtral-embedded"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(engine: Engine, tokenizer, **app_options) -> Iterator[str]:
    """The base URL (`http://127.0.0.1:PORT`) of a server for `engine`, up until exit."""
    port = free_port()
    app = create_app(engine, tokenizer, NAME, **app_options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


def openai_client(url: str) -> openai.OpenAI:
    """The real `openai` client for a test server (no retries: a failure shows at once)."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
