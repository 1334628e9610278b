"""A real `glmtune serve` process on a free local port, with two adapters on tiny-glm."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    url: str  # ends in /v1, as the openai client wants it
    root: str
    log: Path
    proc: subprocess.Popen

    def health(self) -> dict:
        return httpx.get(f"{self.root}/health", timeout=30).json()

    def wait_for(self, check, what: str, timeout: float = 300) -> dict:
        """Poll /health until ``check(health)`` holds (a deadline, not a timed assert)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = self.health()
            if check(health):
                return health
            time.sleep(0.05)
        raise AssertionError(f"server never reached: {what}; last /health: {self.health()}")

    def client(self, api_key: str = "none", **kwargs):
        from openai import OpenAI

        # max_retries=0: a 429 must reach the test, not be retried away by the client
        return OpenAI(base_url=self.url, api_key=api_key, max_retries=0, timeout=600, **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: list[str], log: Path, env: dict | None = None) -> Server:
    port = free_port()
    extra = env or {}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("GLMTUNE_API_KEY", None)  # only the test decides whether a key is needed
    env.update(extra)
    # float32 and one thread: batched greedy answers then equal one-at-a-time answers
    command = [sys.executable, "-m", "glmtune", "serve", *map(str, args), "--port", str(port),
               "--bf16", "false", "--threads", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"glmtune serve exited with {proc.returncode}:\n"
                                 f"{log.read_text('utf-8', 'replace')}")
        try:
            if httpx.get(f"{root}/health", timeout=5).status_code == 200:
                return Server(f"{root}/v1", root, log, proc)
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"glmtune serve did not come up:\n{log.read_text('utf-8', 'replace')}")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="session")
def second_adapter(tiny_model, tmp_path_factory) -> Path:
    """Another random adapter on the same base: different weights, different answers, and
    trained (says its run config) with another prompt format, which serving must keep."""
    from glmtune.train.artifacts import RUN_CONFIG
    from tests.fixtures.random_adapter import build_random_adapter

    out = build_random_adapter(tiny_model, tmp_path_factory.mktemp("adapter-b") / "lora-b",
                               seed=1)
    (out / RUN_CONFIG).write_text(f"model: {tiny_model}\ntemplate: plain\n", "utf-8")
    return out
