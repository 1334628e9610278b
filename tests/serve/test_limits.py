"""`glmtune serve` with an API key (from GLMTUNE_API_KEY), a queue of one and prompt logging."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from tests.serve.conftest import start_server, stop_server

pytestmark = pytest.mark.slow

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def server(adapter, tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-limits") / "server.log"
    server = start_server(["--adapter", f"a={adapter}", "--model", tiny_model, "--queue-size", 1,
                           "--batch-size", 1, "--log-prompts"], log,
                          env={"GLMTUNE_API_KEY": KEY})
    yield server
    stop_server(server)


def ask(client, content="你好", max_tokens=4, **kwargs):
    return client.chat.completions.create(
        model="a", messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
        temperature=0, **kwargs)


def test_every_endpoint_but_health_needs_the_key(server):
    assert httpx.get(f"{server.root}/health", timeout=60).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/models"), ("POST", "/chat/completions"),
                             ("POST", "/completions")):
            reply = httpx.request(method, server.url + path, headers=headers, timeout=60,
                                  json={"model": "a", "prompt": "x"})
            assert reply.status_code == 401, (method, path, headers)
            assert reply.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").models.list()
    assert ask(server.client(KEY)).choices[0].message.content
    assert "Authorization: Bearer $GLMTUNE_API_KEY" in server.log.read_text("utf-8")


def test_full_queue_answers_429_with_retry_after(server):
    client = server.client(KEY)
    # one long answer holds the only worker ...
    holder = client.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "hello"}], max_tokens=2000,
        temperature=0, stream=True)
    next(iter(holder))
    server.wait_for(lambda h: h["running"] == 1, "the long answer running")
    # ... one more request fills the queue of one ...
    waiting: list = []
    thread = threading.Thread(target=lambda: waiting.append(ask(server.client(KEY))))
    thread.start()
    server.wait_for(lambda h: h["queued"] == 1, "one request waiting")
    # ... and the next is turned away, not queued
    reply = httpx.post(f"{server.url}/chat/completions", timeout=60,
                       headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "a", "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 429 and int(reply.headers["Retry-After"]) >= 1
    assert reply.json()["error"]["code"] == "queue_full"
    with pytest.raises(openai.RateLimitError):
        ask(client)
    assert server.health()["rejected"] == 2
    holder.close()  # the long answer is cancelled, the waiting request gets its turn
    thread.join(timeout=600)
    assert waiting and waiting[0].choices[0].message.content
    assert server.health()["queued"] == 0


def test_client_leaving_the_queue_frees_its_place(server):
    holder = server.client(KEY).chat.completions.create(
        model="a", messages=[{"role": "user", "content": "hello"}], max_tokens=2000,
        temperature=0, stream=True)
    next(iter(holder))
    before = server.wait_for(lambda h: h["running"] == 1, "the long answer running")
    with pytest.raises(httpx.ReadTimeout):  # this client gives up while it waits
        httpx.post(f"{server.url}/chat/completions", timeout=httpx.Timeout(60, read=1),
                   headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "a", "messages": [{"role": "user", "content": "hi"}]})
    server.wait_for(lambda h: h["queued"] == 0 and h["cancelled"] == before["cancelled"] + 1,
                    "the abandoned request out of the queue")
    waiting: list = []  # its place is free again: the next request waits instead of a 429
    thread = threading.Thread(target=lambda: waiting.append(ask(server.client(KEY))))
    thread.start()
    server.wait_for(lambda h: h["queued"] == 1, "the next request waiting")
    holder.close()
    thread.join(timeout=600)
    assert waiting and server.health()["rejected"] == before["rejected"]


def test_prompts_are_logged_when_asked(server):
    answer = ask(server.client(KEY), "日志里的问题").choices[0].message.content
    log = server.log.read_text("utf-8")
    assert "日志里的问题" in log and answer in log
