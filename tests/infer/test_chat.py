"""`glmtune chat`: multi-turn history, /clear, /exit, streamed output, stdin from a pipe."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from glmtune.config import PredictConfig
from glmtune.infer.chat import run_chat
from glmtune.infer.predict import Predictor
from tests.fixtures.random_adapter import build_random_adapter

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    return build_random_adapter(tiny_model, tmp_path_factory.mktemp("chat-adapter") / "lora",
                                seed=1)


@pytest.fixture(scope="module")
def predictor(adapter, tiny_model):
    return Predictor(PredictConfig(adapter=str(adapter), model=str(tiny_model),
                                   max_new_tokens=8, bf16="false", threads=1))


class EchoPredictor:
    """Streams "<turn n>: <message>" in pieces and records the history it was given."""

    family = type("Family", (), {"template": "glm4"})()

    def __init__(self):
        self.histories = []

    def stream(self, message, history):
        self.histories.append(list(history))
        yield from [f"turn {len(history) + 1}", ": ", message, "  \n"]


def test_history_clear_and_exit():
    fake = EchoPredictor()
    stdout, stderr = io.StringIO(), io.StringIO()
    stdin = io.StringIO("你好\n\n再见\n/clear\n还在吗\n/exit\n不会被读到\n")
    assert run_chat(fake, stdin, stdout, stderr, interactive=False) == 3
    # trailing whitespace of a streamed answer is held back: stdout is the stripped answers
    assert stdout.getvalue() == "turn 1: 你好\nturn 2: 再见\nturn 1: 还在吗\n"
    assert fake.histories == [[], [("你好", "turn 1: 你好")], []]
    assert "cleared" in stderr.getvalue()


def test_end_of_input_ends_the_chat():
    stdout = io.StringIO()
    assert run_chat(EchoPredictor(), io.StringIO("一"), stdout, io.StringIO(),
                    interactive=False) == 1
    assert stdout.getvalue() == "turn 1: 一\n"


def test_stream_pieces_make_the_generated_answer(predictor):
    history = [("你好", predictor.generate("你好"))]
    pieces = list(predictor.stream("再见", history))
    assert "".join(pieces).strip() == predictor.generate("再见", history)


def test_chat_through_a_pipe(adapter, tiny_model, predictor):
    first = predictor.generate("你好")
    second = predictor.generate("再见", [("你好", first)])
    after_clear = predictor.generate("再见")
    assert second != after_clear  # else the transcript could not show the history is used
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "glmtune", "chat", "--adapter", str(adapter), "--model",
         str(tiny_model), "--max-new-tokens", "8", "--bf16", "false", "--threads", "1"],
        input="你好\n再见\n/clear\n再见\n/exit\n你好\n", capture_output=True, text=True,
        encoding="utf-8", env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{first}\n{second}\n{after_clear}\n"
    assert "/clear" in proc.stderr  # the banner says how to use it


def test_a_message_beyond_the_context_is_refused_and_the_chat_goes_on(predictor):
    stdout, stderr = io.StringIO(), io.StringIO()
    stdin = io.StringIO("北京" * 60_000 + "\n你好\n")
    assert run_chat(predictor, stdin, stdout, stderr, interactive=False) == 1
    assert "do not fit the model's context" in stderr.getvalue()
    assert stdout.getvalue() == predictor.generate("你好") + "\n"
