"""The real page in a real browser: `glmtune webui` on a free port, Debian's chromium
driven by Playwright (its own browser download is never used).

One walk through the default job, in the order a user would go: check a bad data
file, start training with a few steps, watch the plot gain points, reload mid-run
and see the page re-attach, stop (checkpoint) and resume to the end, chat with the
adapter, evaluate, export, and the page in Chinese. Every request that leaves
127.0.0.1 is blocked and recorded: the page must render without the internet.

Screenshots of each tab go to the test's tmp dir; GLMTUNE_SCREENSHOTS=docs also
writes them to docs/webui-<tab>.png for the README.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import read_jsonl

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
MAX_STEPS = 300   # long enough to reload and stop mid-run, a few seconds per 100 steps
NEW_TOKENS = 48  # enough for a triplet or two; generation is the slow part of chat / eval
PROMPT = "请从以下文本中抽取三元组，格式为(主体, 关系, 客体):\n苹果公司是一家美国的科技公司。"


def _chromium() -> str:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.skip("no chromium browser found (apt-get install chromium; .ci/run installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def workspace(tmp_path, tiny_model, triplet_dir, monkeypatch):
    """A project directory as `make train` leaves it: default data, tiny-glm."""
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    for name in ("train_triplet.jsonl", "val_triplet.jsonl"):
        shutil.copy(triplet_dir / name, work / "data" / name)
    monkeypatch.setenv("GLMTUNE_MODELS_DIR", str(tiny_model.parent))
    return work


@pytest.fixture
def server(workspace, tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(tmp_path / "server.log", "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "glmtune", "webui", "--port", str(port)],
                                cwd=workspace, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, (tmp_path / "server.log").read_text()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.5)
    yield url
    proc.send_signal(signal.SIGTERM)  # stops a running job with a checkpoint, then exits
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    executable = _chromium()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _offline_page(browser, url: str, locale: str, blocked: list[str]):
    context = browser.new_context(locale=locale, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)

    def only_local(route):
        if route.request.url.startswith(url):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(url)
    return page


def _text(page, selector: str) -> str:
    """What an element shows: a text box's value, or the element's rendered text."""
    element = page.locator(selector)
    box = element.locator("textarea")
    return box.first.input_value() if box.count() else element.inner_text()


def _wait_text(page, selector: str, pattern: str, timeout: float = 90) -> re.Match:
    """Poll an element's text until ``pattern`` matches (the page updates it itself)."""
    deadline = time.monotonic() + timeout
    while True:
        text = _text(page, selector)
        match = re.search(pattern, text)
        if match:
            return match
        assert time.monotonic() < deadline, f"{selector}: {pattern!r} never appeared; last: {text!r}"
        page.wait_for_timeout(300)


def _fill(page, option: str, value, tab: str = "opt") -> None:
    element = f"#{tab}-{option}"
    page.locator(f"{element} textarea, {element} input").first.fill(str(value))


def _points(page) -> int:
    return int(_wait_text(page, "#progress", r"(\d+) points plotted").group(1))


def _screenshot(page, tmp_path: Path, tab: str) -> Path:
    from PIL import Image, ImageStat

    path = tmp_path / f"webui-{tab}.png"
    page.screenshot(path=str(path), full_page=True)
    image = Image.open(path).convert("L")
    # a blank (or single-colour) page has no variance; a rendered tab has text and widgets
    assert ImageStat.Stat(image).stddev[0] > 10, f"{tab} screenshot looks blank"
    if os.environ.get("GLMTUNE_SCREENSHOTS"):
        docs = REPO / os.environ["GLMTUNE_SCREENSHOTS"]
        docs.mkdir(exist_ok=True)
        small = Image.open(path).convert("RGB")
        small = small.resize((small.width * 3 // 4, small.height * 3 // 4), Image.LANCZOS)
        small.quantize(colors=64).save(docs / path.name, optimize=True)
    return path


def test_whole_job_in_the_browser(server, browser, workspace, tmp_path):
    blocked: list[str] = []
    page = _offline_page(browser, server, "en-US", blocked)
    page.get_by_role("tab", name="Train").wait_for()
    # the default data, checked when the page loads: format and rows previewed
    _wait_text(page, "#data-status", r"data/train_triplet\.jsonl: 40 rows, format prompt_response")
    assert "苹果" in _text(page, "#data-preview") or "(" in _text(page, "#data-preview")

    # a bad data file: the page names the file and the line, as the CLI does
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n'
                   '{"prompt": "e"}\n', encoding="utf-8")
    page.locator("#data-upload input[type=file]").set_input_files(str(bad))
    error = _wait_text(page, "#data-status", r"bad\.jsonl:(\d+)")
    assert error.group(1) == "3"
    assert "response" in _text(page, "#data-status")
    # back to the default data
    page.locator("#data-path textarea, #data-path input").first.fill("data/train_triplet.jsonl")
    page.locator("#data-check").click()
    _wait_text(page, "#data-status", r"40 rows, format prompt_response")

    # the default job, shortened
    _fill(page, "max_steps", MAX_STEPS)
    _fill(page, "batch_size", 2)
    _fill(page, "max_seq_len", 96)
    page.get_by_text("More options").click()
    _fill(page, "logging_steps", 5)
    _fill(page, "eval_steps", 50)
    _fill(page, "save_steps", 1000)
    page.locator("#plan-button").click()
    _wait_text(page, "#plan", r"predicted peak memory: [\d.]+ GB")

    page.locator("#start").click()
    _wait_text(page, "#action", r"Started: glmtune train .*--max-steps 300")
    _wait_text(page, "#job-status", r"Running \(pid \d+\)")
    first = _points(page)
    page.locator("#start").click()  # one job per server
    _wait_text(page, "#action", r"already running")

    # a reload re-attaches to the running job from the server and its output dir
    page.reload()
    _wait_text(page, "#job-status", r"Running \(pid \d+\)")
    deadline = time.monotonic() + 60
    while _points(page) <= first:
        assert time.monotonic() < deadline, "the plot gained no points after the reload"
        page.wait_for_timeout(300)
    # the plot is drawn (Gradio re-renders it on every update: wait for a drawn frame)
    page.locator("#loss-plot canvas, #loss-plot svg").first.wait_for(timeout=30_000)

    # Stop = Ctrl-C: a checkpoint; Resume continues it (here to a few steps further)
    page.locator("#stop").click()
    stopped = int(_wait_text(page, "#job-status", r"Stopped at step (\d+)").group(1))
    assert 0 < stopped < MAX_STEPS
    assert (workspace / "models/chatglm-lora" / f"checkpoint-{stopped}").is_dir()
    end = stopped + 5
    _fill(page, "max_steps", end)
    page.locator("#resume").click()
    _wait_text(page, "#action", r"--resume auto")
    _wait_text(page, "#job-status", r"Finished", timeout=150)
    _wait_text(page, "#progress", rf"step {end} / {end}")
    log = _text(page, "#log")
    assert "resumed from" in log and "adapter saved to" in log
    metrics = read_jsonl(workspace / "models/chatglm-lora/metrics.jsonl")
    assert _points(page) == len(metrics)
    page.locator("#plan-button").click()  # the plan, as a user checks it before a next run
    _wait_text(page, "#plan", r"predicted peak memory: [\d.]+ GB")
    page.wait_for_timeout(500)  # the plot redraws after the last refresh
    _screenshot(page, tmp_path, "train")

    # chat with the adapter: the streamed answer is what Predictor gives for the prompt
    expected = _expected_answer(workspace / "models/chatglm-lora")  # while the server idles
    assert expected
    page.get_by_role("tab", name="Chat").click()
    _fill(page, "threads", 1, "chat")
    _fill(page, "max_new_tokens", NEW_TOKENS, "chat")
    page.locator("#chat-message textarea").fill(PROMPT)
    page.locator("#chat-send").click()
    bot = page.locator("#chatbot [data-testid=bot]").last
    deadline = time.monotonic() + 90
    while bot.count() == 0 or " ".join(bot.inner_text().split()) != " ".join(expected.split()):
        assert time.monotonic() < deadline, (
            f"chat answer {bot.inner_text() if bot.count() else None!r} != {expected!r}")
        page.wait_for_timeout(300)
    # a second turn, the base model answering beside the adapter
    page.locator("#chat-compare input").check()
    page.locator("#chat-message textarea").fill(PROMPT)
    page.locator("#chat-send").click()
    base = page.locator("#chatbot-base [data-testid=bot]")
    deadline = time.monotonic() + 90
    while base.count() == 0 or not base.last.inner_text().strip():
        assert time.monotonic() < deadline, "the base model never answered"
        page.wait_for_timeout(300)
    assert page.locator("#chatbot [data-testid=bot]").count() == 2
    _screenshot(page, tmp_path, "chat")
    page.locator("#chat-clear").click()
    deadline = time.monotonic() + 30
    while page.locator("#chatbot [data-testid=bot]").count():
        assert time.monotonic() < deadline, "the history was not cleared"
        page.wait_for_timeout(200)

    # evaluate: F1 on the page is the one in metrics.json
    page.get_by_role("tab", name="Evaluate").click()
    _fill(page, "threads", 1, "eval")
    _fill(page, "max_new_tokens", NEW_TOKENS, "eval")
    page.locator("#eval-run").click()
    _wait_text(page, "#eval-status", r"8 examples", timeout=120)
    f1_row = _wait_text(page, "#eval-summary", r"f1\s+([\d.]+)")
    scores = _eval_scores(workspace / "models/chatglm-lora/eval/metrics.json")
    assert f1_row.group(1) == f"{scores['adapter']['f1']:.4f}"
    _screenshot(page, tmp_path, "evaluate")

    page.get_by_role("tab", name="Export").click()
    page.locator("#export-run").click()
    merged = workspace / "models/chatglm-lora-merged"
    _wait_text(page, "#export-result", r"saved to .*chatglm-lora-merged", timeout=120)
    assert any(merged.glob("*.safetensors"))
    _screenshot(page, tmp_path, "export")

    # Chinese for a browser that asks for it, server messages included
    zh = _offline_page(browser, server, "zh-CN", blocked)
    zh.get_by_role("tab", name="训练").wait_for()
    _wait_text(zh, "#job-status", r"已完成")
    # and the English page switches to Chinese in Gradio's own Settings panel
    page.locator("button.settings").click()
    page.get_by_label("Language").first.click()
    page.locator("[role=option]", has_text="简体中文").first.click()
    page.keyboard.press("Escape")
    page.get_by_role("tab", name="训练").wait_for()
    assert blocked == [], f"the page tried to reach the internet: {blocked}"


def _eval_scores(path: Path) -> dict:
    import json

    return json.loads(path.read_text("utf-8"))["scores"]


def _expected_answer(adapter: Path) -> str:
    from glmtune.config import ChatConfig
    from glmtune.infer.predict import Predictor

    config = ChatConfig(adapter=str(adapter), threads=1, max_new_tokens=NEW_TOKENS)
    return Predictor(config.predict_config()).generate(PROMPT)
