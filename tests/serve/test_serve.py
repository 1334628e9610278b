"""`glmtune serve` driven by the official openai client: a real server process on tiny-glm
with two random adapters (models "a" and "b") and the bare base ("tiny-glm")."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from glmtune.config import PredictConfig
from glmtune.data.sample import Message
from glmtune.infer.predict import Predictor, Sampling
from tests.serve.conftest import start_server, stop_server

# One server process for the module; starting it (model load) is what makes these slow.
pytestmark = pytest.mark.slow

MAX = 8  # max_tokens of the comparisons: short answers keep the suite fast
MODELS = ["a", "b", "tiny-glm"]


@pytest.fixture(scope="module")
def server(adapter, second_adapter, tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    server = start_server(["--adapter", f"a={adapter},b={second_adapter}", "--model", tiny_model,
                           "--max-new-tokens", MAX], log)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def predictors(adapter, second_adapter, tiny_model):
    """The same models in this process, as `glmtune predict` loads them."""
    def load(path):
        return Predictor(PredictConfig(adapter=str(path), model=str(tiny_model),
                                       max_new_tokens=MAX, bf16="false", threads=1))

    return {"a": load(adapter), "b": load(second_adapter), "tiny-glm": load("")}


def chat(client, model, content, **kwargs):
    messages = content if isinstance(content, list) else [{"role": "user", "content": content}]
    return client.chat.completions.create(model=model, messages=messages, max_tokens=MAX,
                                          temperature=0, **kwargs)


def test_models_are_the_adapters_and_the_base(server):
    client = server.client()
    assert [m.id for m in client.models.list()] == MODELS
    assert client.models.retrieve("b").id == "b"
    with pytest.raises(openai.NotFoundError, match="served models: a, b, tiny-glm"):
        client.models.retrieve("gpt-4")


def test_each_model_answers_as_predict_does(server, predictors, adapter, tiny_model, run_cli):
    client = server.client()
    answers = {m: chat(client, m, "你好").choices[0].message.content for m in MODELS}
    assert answers == {m: p.generate("你好") for m, p in predictors.items()}
    assert len(set(answers.values())) == 3  # each request really got its own weights
    for model, path in (("a", adapter), ("tiny-glm", "")):
        code, out, _ = run_cli("predict", "--adapter", path, "--model", tiny_model, "--prompt",
                               "你好", "--max-new-tokens", MAX, "--bf16", "false", "--threads", 1)
        assert code == 0 and out.strip() == answers[model]


def test_chat_history_and_system_use_the_training_format(server, predictors):
    messages = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "再见"}]
    reply = chat(server.client(), "b", messages)
    predictor = predictors["b"]
    assert predictor.family.template == "plain"  # "a" and the base use glm4
    ids = predictor.conversation_ids([Message(m["role"], m["content"]) for m in messages])
    assert ids != predictors["a"].conversation_ids(
        [Message(m["role"], m["content"]) for m in messages])
    expected = predictor.run([ids], [Sampling(max_new_tokens=MAX)])[0]
    assert reply.choices[0].message.content == expected.text
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), MAX)
    assert reply.usage.total_tokens == len(ids) + MAX
    assert reply.choices[0].finish_reason == "length"


def test_completion_continues_the_raw_text(server, predictors):
    reply = server.client().completions.create(model="a", prompt="北京是", max_tokens=MAX)
    predictor = predictors["a"]
    ids = predictor.tokenizer.encode("北京是", add_special_tokens=False)
    assert reply.choices[0].text == predictor.run([ids], [Sampling(max_new_tokens=MAX)])[0].text
    assert reply.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_stream_reassembled_equals_the_whole_answer(server, kind):
    client = server.client()
    if kind == "chat":
        whole = chat(client, "a", "北京是中国的首都。")
        chunks = list(chat(client, "a", "北京是中国的首都。", stream=True,
                           stream_options={"include_usage": True}))
        text = whole.choices[0].message.content
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    else:
        whole = client.completions.create(model="b", prompt="你好", max_tokens=MAX)
        chunks = list(client.completions.create(model="b", prompt="你好", max_tokens=MAX,
                                                stream=True, stream_options={"include_usage": True}))
        text = whole.choices[0].text
        pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # really streamed
    assert "".join(pieces) == text
    last = [c for c in chunks if c.choices][-1]
    assert last.choices[0].finish_reason == "length"
    # usage on the last piece always, and in the include_usage chunk after it
    assert last.usage.model_dump() == chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert not chunks[-1].choices


def test_stop_strings_and_seeds(server):
    client = server.client()
    full = chat(client, "a", "你好").choices[0].message.content
    stop = full[len(full) // 2:][:2]
    cut = chat(client, "a", "你好", stop=[stop])
    assert cut.choices[0].message.content == full[:full.find(stop)].rstrip()
    assert cut.choices[0].finish_reason == "stop"
    hot = [client.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "你好"}], max_tokens=MAX,
        temperature=1.5, seed=seed).choices[0].message.content for seed in (7, 7, 8, 9)]
    assert hot[0] == hot[1] and len(set(hot)) > 1


def test_concurrent_clients_each_get_their_own_answer(server):
    prompts = ["你好", "北京是中国的首都。", "a", "马云创立了阿里巴巴集团。"]
    requests = [(MODELS[i % 3], prompts[i % 4]) for i in range(16)]
    client = server.client()
    expected = {r: chat(client, *r).choices[0].message.content for r in set(requests)}
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        # a client per thread, as separate applications would have
        results[i] = chat(server.client(), *requests[i]).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i] for i in range(len(requests))] == [expected[r] for r in requests]
    health = server.health()
    assert health["batch_size"] == 8  # float32: batching is on by default
    assert health["largest_batch"] > 1  # they were really generated together


def test_client_leaving_mid_stream_frees_its_slot(server):
    before = server.health()["cancelled"]
    stream = server.client().chat.completions.create(
        model="a", messages=[{"role": "user", "content": "hello"}], max_tokens=2000,
        temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    # the 2000-token generation ends at once as cancelled, not as finished
    health = server.wait_for(lambda h: h["running"] == 0 and h["cancelled"] > before,
                             "the abandoned stream cancelled")
    assert health["queued"] == 0
    assert chat(server.client(), "a", "你好").choices[0].message.content


BAD = {
    "unknown model": ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]},
                      404, "model", "served models: a, b, tiny-glm"),
    "wrong type": ({"model": "a", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": "many"}, 400, "max_tokens", "valid integer"),
    "messages not a list": ({"model": "a", "messages": "hi"}, 400, "messages", "valid list"),
    "temperature out of range": ({"model": "a", "messages": [{"role": "user", "content": "hi"}],
                                  "temperature": 5}, 400, "temperature", "less than or equal"),
    "beyond the context": ({"model": "a", "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 100000}, 400, "max_tokens", "context of 2048"),
    "empty messages": ({"model": "a", "messages": []}, 400, "messages", "at least 1"),
    "unknown role": ({"model": "a", "messages": [{"role": "tool", "content": "hi"}]}, 400,
                     "messages.0.role", "'system', 'user' or 'assistant'"),
    "ends with assistant": ({"model": "a", "messages": [{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": "x"}]},
                            400, "messages", "must end with a user message"),
    "roles out of order": ({"model": "a", "messages": [{"role": "user", "content": "hi"},
                                                       {"role": "user", "content": "x"}]},
                           400, "messages", "role 'user' out of order"),
    "several choices": ({"model": "a", "messages": [{"role": "user", "content": "hi"}], "n": 2},
                        400, "n", "less than or equal to 1"),
    "too many stops": ({"model": "a", "messages": [{"role": "user", "content": "hi"}],
                        "stop": list("abcde")}, 400, "stop", "at most 4"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_chat_requests_get_openai_errors(server, case):
    body, status, param, words = BAD[case]
    reply = httpx.post(f"{server.url}/chat/completions", json=body, timeout=60)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"]
    assert "Traceback" not in reply.text
    assert server.health()["status"] == "ok"  # and it keeps serving


@pytest.mark.parametrize("body, words", [
    (b'{"model": "a", "messages": [', "malformed JSON"),
    (b"[1, 2]", "valid dictionary"),
    (b"\xff\xfe", "malformed JSON"),
])
def test_malformed_bodies(server, body, words):
    reply = httpx.post(f"{server.url}/chat/completions", content=body, timeout=60,
                       headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and words in reply.json()["error"]["message"]


@pytest.mark.parametrize("prompt, words", [("", "must not be empty"),
                                           (["一", "二"], "one prompt per request")])
def test_bad_completion_prompts(server, prompt, words):
    with pytest.raises(openai.BadRequestError, match=words):
        server.client().completions.create(model="a", prompt=prompt, max_tokens=MAX)


def test_openai_client_sees_typed_errors(server):
    with pytest.raises(openai.NotFoundError, match="served models"):
        chat(server.client(), "nope", "hi")
    reply = httpx.get(f"{server.root}/no/such/path", timeout=60)
    assert reply.status_code == 404 and reply.json()["error"]["message"] == "Not Found"


def test_without_a_key_no_auth_is_needed_and_prompts_are_not_logged(server):
    assert httpx.get(f"{server.url}/models", timeout=60).status_code == 200
    log = server.log.read_text("utf-8")
    assert f"curl {server.url}/chat/completions" in log and "OpenAI(base_url=" in log
    assert "prompt + " in log  # requests are logged, by size only
    assert "北京是中国的首都" not in log and "马云" not in log
