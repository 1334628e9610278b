"""``glmtune serve``: an OpenAI-compatible API over a base model and its adapters.

``engine`` holds the model, the adapters and the request queue; ``app`` is the HTTP API.
"""

from __future__ import annotations

import json
import logging
import os
import shlex

from glmtune.config import ServeConfig

log = logging.getLogger("glmtune.serve")


def serve(config: ServeConfig) -> None:
    """Load the model and adapters, print how to call them, answer until Ctrl-C."""
    import uvicorn

    from glmtune.serve.app import create_app
    from glmtune.serve.engine import Engine

    api_key = config.api_key or os.environ.get("GLMTUNE_API_KEY") or None
    sock = _bind(config.host, config.port)  # a taken port fails before the slow model load
    try:
        engine = Engine(config)
    except BaseException:
        sock.close()
        raise
    try:
        print(banner(config, engine, api_key is not None), flush=True)
        # A stream still running at Ctrl-C gets a few seconds, then the server stops.
        server = uvicorn.Server(uvicorn.Config(create_app(engine, api_key), log_level="warning",
                                               access_log=False, timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    finally:
        engine.close()


def _bind(host: str, port: int):
    """The listening socket: a taken port is an error naming it, not a traceback."""
    import socket

    from glmtune.errors import GlmtuneError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise GlmtuneError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick "
                           "another --port (Make: PORT=) or --host") from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def banner(config: ServeConfig, engine, keyed: bool) -> str:
    """The URL, the served models and a copy-paste curl and Python example."""
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    url = f"http://{host}:{config.port}/v1"
    model = next(iter(engine.models))
    adapters = len(engine.models) - 1
    how = (f"{adapters} adapter(s) on one base through PEFT, switched per request; "
           if adapters else "")
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "你好"}]},
                      ensure_ascii=False)
    auth = ' -H "Authorization: Bearer $GLMTUNE_API_KEY"' if keyed else ""
    key = 'os.environ["GLMTUNE_API_KEY"]' if keyed else '"none"'
    lines = [
        f"glmtune serve: {url}  (listening on {config.host}:{config.port})",
        f"models: {', '.join(engine.models)}  ({how}the bare base as {engine.base_name!r})",
        (f"queue: {config.queue_size} waiting requests at most, batches of up to "
         f"{engine.batch_size}{' (bf16: see --batch-size)' if engine.predictor.bf16 else ''}; "
         f"prompts {'ARE' if config.log_prompts else 'are not'} logged"),
    ]
    if keyed:
        lines.append("auth: every endpoint but /health needs the API key "
                     "(set GLMTUNE_API_KEY to it for the examples)")
    lines += [
        "",
        "curl:",
        f"  curl {url}/chat/completions -H 'Content-Type: application/json'{auth} \\",
        f"    -d {shlex.quote(body)}",
        "",
        "Python (pip install openai):",
        ("  import os; " if keyed else "  ") + "from openai import OpenAI",
        f"  client = OpenAI(base_url={url!r}, api_key={key})",
        (f"  reply = client.chat.completions.create(model={model!r}, "
         "messages=[{'role': 'user', 'content': '你好'}])"),
        "  print(reply.choices[0].message.content)",
        "",
        "Ctrl-C stops the server.",
    ]
    return "\n".join(lines)
