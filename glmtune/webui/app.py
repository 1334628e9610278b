"""``glmtune webui``: one Gradio page for the whole job.

Train (model, data with preview, options generated from the config schema,
the plan before anything loads, a live loss plot and memory while the run
goes), Chat (streaming, optionally beside the base model), Evaluate and
Export. Training is the ``glmtune train`` command in a subprocess
(``jobs.py``); chat, evaluation and export call the same functions the CLI
commands do, in the server process.
"""

from __future__ import annotations

import os

# Before gradio is imported anywhere: the page never phones home.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import threading
from contextlib import contextmanager
from pathlib import Path

import gradio as gr

from glmtune import config as cfg
from glmtune.errors import GlmtuneError
from glmtune.webui import jobs, labels, progress, schema

# Train-tab options shown up front; every other TrainConfig field is under
# "More options". Model and data have their own inputs (upload, preview);
# resume is the Resume button.
MAIN_OPTIONS = ("preset", "output_dir", "epochs", "max_steps", "batch_size", "lr", "lora_r",
                "max_seq_len", "quant", "memory_limit", "overwrite")
OWN_INPUTS = ("model", "data", "resume")
PREVIEW_ROWS = 5
REFRESH_SECONDS = 1.0
# system fonts only: the default theme would fetch Google Fonts
FONTS = ["ui-sans-serif", "system-ui", "Noto Sans CJK SC", "sans-serif"]
MONO_FONTS = ["ui-monospace", "DejaVu Sans Mono", "monospace"]


def _lang(request) -> str:
    headers = getattr(request, "headers", None) or {}
    return labels.language(headers.get("accept-language"))


class PredictorCache:
    """One loaded model at a time, shared by Chat and Evaluate, used by one caller at a time."""

    def __init__(self):
        self._lock = threading.Lock()
        self._key: str | None = None
        self._predictor = None

    @contextmanager
    def use(self, predict_config: cfg.PredictConfig):
        from glmtune.infer.predict import Predictor

        with self._lock:
            key = repr(predict_config)
            if key != self._key:
                self._predictor, self._key = None, None  # free the old one before loading
                self._predictor, self._key = Predictor(predict_config), key
            yield self._predictor


# ---------------------------------------------------------------- train tab
def check_data(path: str, lang: str = "en"):
    """(message, preview rows) for a data file: format, row count, the first rows, or
    the DataError naming file:line."""
    from glmtune.data.formats import read_samples

    path = (path or "").strip()
    try:
        samples, fmt = read_samples(path)
    except GlmtuneError as exc:
        return f"error: {exc}", []
    rows = []
    for i, sample in enumerate(samples[:PREVIEW_ROWS], 1):
        if sample.is_plain:
            rows.append([i, "", sample.text])
        else:
            prompt = "\n".join(f"{m.role}: {m.content}" for m in sample.messages[:-1])
            rows.append([i, prompt, sample.messages[-1].content])
    return labels.text(lang, "msg_data_ok", path=path, rows=len(samples), format=fmt), rows


def train_values(names: list[str], model: str, data: str, values) -> dict:
    form = dict(zip(names, values))
    form.update(model=model, data=data)
    return form


def plan_text(form: dict) -> tuple[str, float | None]:
    """What `glmtune plan` says for these settings, and the memory budget in GB."""
    from glmtune.model import load
    from glmtune.plan import hardware, plan_for_model, presets, report

    config = schema.build(cfg.TrainConfig, form)
    hw = hardware.detect()
    plan, final, _ = plan_for_model(config, hw, load.resolve(config.model))
    note = presets.pick(hw)[1] if config.preset == "auto" else None
    budget = plan.budget_bytes / hardware.GB if plan.budget_bytes else None
    return report(hw, plan, final, note), budget


def job_view(registry: jobs.JobRegistry, out_text: str, lang: str):
    """(status, progress line, loss frame, log) for the page, from the job and its files."""
    job = registry.job
    out = job.output_dir if job is not None else Path((out_text or "").strip() or ".")
    log_text = progress.read_log(out, jobs.LOG_FILE)
    state = progress.read_progress(out, log_text)
    if job is None:
        done = (out / "adapter_config.json").is_file()
        status = labels.text(lang, "msg_finished" if done else "msg_no_job", out=out)
    elif job.running:
        status = labels.text(lang, "msg_running", pid=job.pid, out=out)
    elif job.returncode == 0:
        status = labels.text(lang, "msg_finished", out=out)
    elif job.returncode in (130, 143):  # SIGINT / SIGTERM: Stop, or the server shutting down
        status = (labels.text(lang, "msg_stopped", step=state.stopped_at, out=out)
                  if state.stopped_at is not None
                  else labels.text(lang, "msg_stopped_early", code=job.returncode))
    else:
        status = labels.text(lang, "msg_failed", code=job.returncode,
                             error=progress.last_error(log_text))
    if state.points:
        eta = None
        if job is not None:
            job.observe(state.step)
            eta = job.eta_seconds(state.total_steps) if job.running else 0.0
        budget = job.budget_gb if job is not None else None
        line = labels.text(lang, "msg_progress", step=state.step,
                           total=state.total_steps or "?", epoch=state.epoch,
                           loss=progress.number(state.loss, ".4f"),
                           tps=progress.number(state.tokens_per_s, ".0f"),
                           rss=progress.number(state.rss_gb), peak=progress.number(state.peak_rss_gb),
                           budget=progress.number(budget), eta=progress.duration(eta),
                           points=len(state.points))
    else:
        line = labels.text(lang, "msg_waiting") if job is not None and job.running else ""
    return status, line, state.frame(), log_text


def start_job(registry: jobs.JobRegistry, form: dict, lang: str, resume: bool = False) -> str:
    """Start (or resume) training with the form's settings; the message for the page."""
    previous = registry.job
    if previous is not None and previous.running:
        return labels.text(lang, "msg_busy", pid=previous.pid, out=previous.output_dir)
    try:
        config = schema.build(cfg.TrainConfig, form)
        _, budget = plan_text(form)  # refuses a run that cannot fit before starting it
        settings = schema.changed(cfg.TrainConfig, form)
        flags = schema.argv(cfg.TrainConfig, settings) + (["--resume", "auto"] if resume else [])
        job = registry.start(jobs.train_command(flags), config.output_dir, budget,
                             append_log=resume, settings=settings)
    except jobs.JobBusy as exc:
        return labels.text(lang, "msg_busy", pid=exc.job.pid, out=exc.job.output_dir)
    except GlmtuneError as exc:
        return f"error: {exc}"
    return labels.text(lang, "msg_started", command=jobs.shown(job.command))


# ----------------------------------------------------------------- chat tab
def message_text(message: dict) -> str:
    """The text of a chat message as Gradio hands it back (a string or content parts)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    return "".join(part.get("text", "") for part in content or [] if isinstance(part, dict))


def history_pairs(messages: list[dict]) -> list[tuple[str, str]]:
    """(question, answer) pairs from a chat's messages, as Predictor takes its history."""
    pairs, question = [], None
    for message in messages or []:
        if message.get("role") == "user":
            question = message_text(message)
        elif message.get("role") == "assistant" and question is not None:
            pairs.append((question, message_text(message)))
            question = None
    return pairs


def stream_reply(predictor, message: str, messages: list[dict]):
    """The chat with ``message`` and the answer growing as tokens arrive; the last yield
    holds exactly the answer ``Predictor.generate`` gives."""
    history = history_pairs(messages)
    messages = list(messages or []) + [{"role": "user", "content": message},
                                       {"role": "assistant", "content": ""}]
    answer = ""
    for piece in predictor.stream(message, history):
        answer += piece
        messages[-1] = {"role": "assistant", "content": answer}
        yield messages
    messages[-1] = {"role": "assistant", "content": answer.strip()}
    yield messages


# -------------------------------------------------------------- evaluate tab
def eval_tables(result) -> tuple[list[list], list[str], list[list], list[str]]:
    """Summary rows (metric x model) and per-relation rows of an EvalResult."""
    from glmtune.evaluate.run import summary_rows

    labels_ = list(result.scores)
    summary = [[title, *values] for title, values in summary_rows(result.task, result.scores)]
    relations = []
    if result.task == "triplet":
        for label, scores in result.scores.items():
            for relation, m in scores.per_relation.items():
                relations.append([relation, label, m["support"], f"{m['precision']:.3f}",
                                  f"{m['recall']:.3f}", f"{m['f1']:.3f}"])
    return (summary, ["metric", *labels_], relations,
            ["relation", "model", "support", "P", "R", "F1"])


# ------------------------------------------------------------------- page
def config_inputs(cls: type, prefix: str) -> tuple[list, list[str]]:
    """A row with one input per field of ``cls``; (inputs, field names) in the same order."""
    options = schema.options(cls)
    with gr.Row():
        inputs = [schema.component(o, prefix) for o in options]
    return inputs, [o.name for o in options]


@contextmanager
def command_tab(i18n, command: str, cls: type):
    """The tab of a command run in the server process: (inputs, field names, run button);
    what the block adds below them (its outputs) goes into the tab too."""
    with gr.Tab(i18n(f"tab_{command}"), id=command, elem_id=f"tab-{command}"):
        inputs, names = config_inputs(cls, command)
        button = gr.Button(i18n(f"{command}_button"), variant="primary", elem_id=f"{command}-run")
        yield inputs, names, button


def build(registry: jobs.JobRegistry | None = None, cache: PredictorCache | None = None):
    registry = registry or jobs.JobRegistry()
    cache = cache or PredictorCache()
    i18n = gr.I18n(**labels.LABELS)
    train_options = schema.options(cfg.TrainConfig, skip=OWN_INPUTS)
    main = [o for o in train_options if o.name in MAIN_OPTIONS]
    more = [o for o in train_options if o.name not in MAIN_OPTIONS]

    with gr.Blocks(title="glmtune", analytics_enabled=False) as page:
        gr.Markdown(i18n("title"), elem_id="title")
        with gr.Tabs():
            # ----------------------------------------------------------- train
            with gr.Tab(i18n("tab_train"), id="train", elem_id="tab-train"):
                with gr.Row():
                    model = gr.Textbox(cfg.DEFAULT_MODEL, label=i18n("model"), elem_id="model")
                    data = gr.Textbox(cfg.DEFAULT_TRAIN_FILE, label=i18n("data_path"),
                                      elem_id="data-path")
                    upload = gr.File(label=i18n("data_upload"), elem_id="data-upload",
                                     file_types=[".jsonl", ".json", ".csv", ".txt"],
                                     type="filepath", height=90)
                with gr.Row():
                    check = gr.Button(i18n("data_check"), elem_id="data-check", scale=0)
                    data_status = gr.Markdown(elem_id="data-status")
                preview = gr.Dataframe(headers=["#", "prompt", "response"], label=i18n("data_preview"),
                                       elem_id="data-preview", interactive=False, wrap=True)
                with gr.Row(equal_height=True):
                    main_inputs = [schema.component(o) for o in main]
                with gr.Accordion(i18n("more_options"), open=False), gr.Row():
                    more_inputs = [schema.component(o) for o in more]
                option_inputs = main_inputs + more_inputs
                names = [o.name for o in main + more]
                output_dir = option_inputs[names.index("output_dir")]
                plan_button = gr.Button(i18n("plan_button"), elem_id="plan-button")
                plan_box = gr.Textbox(label=i18n("plan"), lines=6, elem_id="plan",
                                      interactive=False)
                with gr.Row():
                    start = gr.Button(i18n("start"), variant="primary", elem_id="start")
                    stop = gr.Button(i18n("stop"), variant="stop", elem_id="stop")
                    resume = gr.Button(i18n("resume"), elem_id="resume")
                action = gr.Markdown(elem_id="action")
                status = gr.Markdown(label=i18n("job_status"), elem_id="job-status")
                stats = gr.Markdown(label=i18n("progress"), elem_id="progress")
                plot = gr.LinePlot(x="step", y="loss", color="series", label=i18n("loss_plot"),
                                   elem_id="loss-plot", height=260)
                log_box = gr.Textbox(label=i18n("log"), lines=10, max_lines=10, autoscroll=True,
                                     elem_id="log", interactive=False)
                timer = gr.Timer(REFRESH_SECONDS)

            form_inputs = [model, data, *option_inputs]

            def on_check(path, request: gr.Request):
                return check_data(path, _lang(request))

            def on_upload(path, request: gr.Request):
                if not path:
                    return gr.skip(), gr.skip(), gr.skip()
                return (path, *check_data(path, _lang(request)))

            def on_plan(model_, data_, *values):
                try:
                    return plan_text(train_values(names, model_, data_, values))[0]
                except GlmtuneError as exc:
                    return f"error: {exc}"

            def on_start(request: gr.Request, model_, data_, *values):
                return start_job(registry, train_values(names, model_, data_, values),
                                 _lang(request))

            def on_resume(request: gr.Request, model_, data_, *values):
                return start_job(registry, train_values(names, model_, data_, values),
                                 _lang(request), resume=True)

            def on_stop(request: gr.Request):
                lang = _lang(request)
                return labels.text(lang, "msg_stopping" if registry.stop() else "msg_not_running")

            def on_refresh(out_text, request: gr.Request):
                return job_view(registry, out_text, _lang(request))

            def on_load(request: gr.Request, *form):
                # a reloaded page re-attaches to the server's job, not to browser memory:
                # the job's settings back in the form, its output directory followed
                job = registry.job
                if job is not None:
                    form = [schema.form_value(cfg.TrainConfig, name, job.settings)
                            for name in ["model", "data", *names]]
                shown_dir = form[2 + names.index("output_dir")]
                lang = _lang(request)
                return (*form, *job_view(registry, shown_dir, lang), *check_data(form[1], lang))

            check.click(on_check, data, [data_status, preview])
            data.submit(on_check, data, [data_status, preview])
            upload.upload(on_upload, upload, [data, data_status, preview])
            plan_button.click(on_plan, form_inputs, plan_box)
            start.click(on_start, form_inputs, action)
            resume.click(on_resume, form_inputs, action)
            stop.click(on_stop, None, action)
            view = [status, stats, plot, log_box]
            timer.tick(on_refresh, output_dir, view, show_progress="hidden")
            page.load(on_load, form_inputs, [*form_inputs, *view, data_status, preview])

            # ------------------------------------------------------------ chat
            with gr.Tab(i18n("tab_chat"), id="chat", elem_id="tab-chat"):
                with gr.Accordion(i18n("chat_settings"), open=True):
                    chat_inputs, chat_names = config_inputs(cfg.ChatConfig, "chat")
                compare = gr.Checkbox(False, label=i18n("compare_base"), elem_id="chat-compare")
                with gr.Row():
                    chatbot = gr.Chatbot(label=i18n("chat_adapter"), elem_id="chatbot", height=320)
                    chatbot_base = gr.Chatbot(label=i18n("chat_base"), elem_id="chatbot-base",
                                              height=320, visible=False)
                with gr.Row():
                    message = gr.Textbox(label=i18n("message"), elem_id="chat-message", scale=4,
                                         lines=2)
                    send = gr.Button(i18n("send"), variant="primary", elem_id="chat-send",
                                     scale=1)
                    clear = gr.Button(i18n("clear"), elem_id="chat-clear", scale=1)

            def on_send(text, history, history_base, compare_, *values):
                text = (text or "").strip()
                if not text:
                    yield gr.skip(), gr.skip(), gr.skip()
                    return
                try:
                    config = schema.build(cfg.ChatConfig, dict(zip(chat_names, values)))
                    with cache.use(config.predict_config()) as predictor:
                        for messages in stream_reply(predictor, text, history):
                            history = messages
                            yield "", messages, gr.skip()
                        if compare_:
                            with predictor.base_model():
                                for messages in stream_reply(predictor, text, history_base):
                                    yield "", gr.skip(), messages
                except GlmtuneError as exc:
                    raise gr.Error(str(exc)) from exc

            chat_event = {"fn": on_send,
                          "inputs": [message, chatbot, chatbot_base, compare, *chat_inputs],
                          "outputs": [message, chatbot, chatbot_base]}
            send.click(**chat_event)
            message.submit(**chat_event)
            clear.click(lambda: ([], []), None, [chatbot, chatbot_base])
            compare.change(lambda on: gr.update(visible=on), compare, chatbot_base)

            # -------------------------------------------------------- evaluate
            with command_tab(i18n, "eval", cfg.EvalConfig) as (eval_inputs, eval_names,
                                                                eval_button):
                eval_status = gr.Markdown(elem_id="eval-status")
                eval_summary = gr.Dataframe(label=i18n("eval_summary"), elem_id="eval-summary",
                                            interactive=False)
                eval_relations = gr.Dataframe(label=i18n("eval_relations"),
                                              elem_id="eval-relations", interactive=False)
                eval_report = gr.Textbox(label=i18n("eval_report"), lines=8,
                                         elem_id="eval-report", interactive=False)

            def on_eval(request: gr.Request, *values):
                import pandas as pd

                from glmtune.evaluate.run import evaluate

                try:
                    config = schema.build(cfg.EvalConfig, dict(zip(eval_names, values)))
                    with cache.use(config.predict_config()) as predictor:
                        result = evaluate(config, predictor=predictor)
                except GlmtuneError as exc:
                    return f"error: {exc}", None, None, ""
                summary, summary_cols, relations, relation_cols = eval_tables(result)
                done = labels.text(_lang(request), "msg_eval_done", n=result.n,
                                   out=result.output_dir)
                return (done, pd.DataFrame(summary, columns=summary_cols),
                        pd.DataFrame(relations, columns=relation_cols), result.report)

            eval_button.click(on_eval, eval_inputs,
                              [eval_status, eval_summary, eval_relations, eval_report])

            # ---------------------------------------------------------- export
            with command_tab(i18n, "export", cfg.ExportConfig) as (export_inputs, export_names,
                                                                    export_button):
                export_result = gr.Markdown(label=i18n("export_result"), elem_id="export-result")

            def on_export(request: gr.Request, *values):
                from glmtune.infer.export import export

                try:
                    result = export(schema.build(cfg.ExportConfig,
                                                 dict(zip(export_names, values))))
                except GlmtuneError as exc:
                    return f"error: {exc}"
                return labels.text(_lang(request), "msg_exported", out=result.out,
                                   diff=result.max_abs_diff)

            export_button.click(on_export, export_inputs, export_result)
    page.i18n_labels = i18n
    return page


def theme():
    return gr.themes.Default(font=FONTS, font_mono=MONO_FONTS)


def serve(host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    """Run the page until interrupted; a running job is stopped with a checkpoint on exit."""
    import signal

    registry = jobs.JobRegistry()
    page = build(registry)

    def terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        page.queue(default_concurrency_limit=1).launch(
            server_name=host, server_port=port, share=share, inbrowser=False,
            i18n=page.i18n_labels, theme=theme(), footer_links=["settings"],
            show_error=True, quiet=False)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        page.close()
        registry.shutdown()
