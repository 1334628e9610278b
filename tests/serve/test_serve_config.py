"""`glmtune serve` options: parsed from the schema, checked before anything is loaded."""

from __future__ import annotations

import socket

from glmtune.config import ServeConfig
from tests.serve.conftest import free_port


def test_adapters_are_named_after_their_directories():
    config = ServeConfig(adapter="models/chatglm-lora/, extract=runs/v2/lora,")
    assert config.adapters == [("chatglm-lora", "models/chatglm-lora/"),
                               ("extract", "runs/v2/lora")]
    assert ServeConfig(adapter="", model="tiny-glm").adapters == []


def test_every_problem_is_reported_at_once():
    problems = ServeConfig(adapter="a/lora,b/lora", port=0, queue_size=0,
                           batch_size=0).problems()
    assert any("served as 'lora'; name them: NAME=DIR" in p for p in problems)
    assert any(p.startswith("port:") for p in problems)
    assert any(p.startswith("queue_size:") for p in problems)
    assert any(p.startswith("batch_size:") for p in problems)
    assert ServeConfig(adapter="", model=None).problems() == [
        "adapter / model: give adapter directories, or a --model to serve bare"]


def test_safe_defaults():
    config = ServeConfig()
    assert (config.host, config.port, config.api_key, config.log_prompts) == (
        "127.0.0.1", 8000, None, False)


def test_missing_adapters_are_named_together(run_cli, tmp_path, tiny_model):
    code, _, err = run_cli("serve", "--adapter", f"{tmp_path}/one,two={tmp_path}/two",
                           "--model", tiny_model, "--port", free_port())
    assert code == 2
    assert f"{tmp_path}/one: adapter directory not found" in err
    assert f"{tmp_path}/two: adapter directory not found" in err


def test_a_taken_port_is_an_error_not_a_traceback(run_cli, tiny_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_cli("serve", "--adapter", "", "--model", tiny_model, "--port", port)
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err


def test_options_reach_the_cli_and_make(run_cli):
    code, out, _ = run_cli("config", "--make-vars")
    assert code == 0
    for var in ("SERVE_HOST", "PORT", "GLMTUNE_API_KEY", "QUEUE_SIZE", "SERVE_BATCH_SIZE", "LOG_PROMPTS"):
        assert f"  {var} " in out

