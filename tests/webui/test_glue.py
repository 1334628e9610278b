"""The web UI's glue without a browser: schema -> form, form -> command line, the
output directory -> what the page shows, labels, and the one-job registry."""

from __future__ import annotations

import json
import string
import sys
import time
from dataclasses import fields

import pytest

from glmtune import config as cfg
from glmtune.errors import ConfigError
from glmtune.webui import jobs, labels, progress, schema

pytest.importorskip("gradio")


# ------------------------------------------------------------------ schema
@pytest.mark.parametrize("cls", [cfg.TrainConfig, cfg.ChatConfig, cfg.EvalConfig, cfg.ExportConfig])
def test_every_config_field_becomes_one_input(cls):
    by_name = {o.name: o for o in schema.options(cls)}
    assert list(by_name) == [f.name for f in fields(cls)]
    for f in fields(cls):
        option = by_name[f.name]
        assert option.help == f.metadata["help"]
        if f.metadata.get("choices"):
            assert option.kind == "dropdown" and option.choices == f.metadata["choices"]


def test_input_kinds_follow_the_field_types():
    by_name = {o.name: o for o in schema.options(cfg.TrainConfig)}
    assert by_name["overwrite"].kind == "checkbox"
    assert by_name["quant"].kind == "dropdown"
    assert (by_name["batch_size"].kind, by_name["batch_size"].integer) == ("number", True)
    assert (by_name["lr"].kind, by_name["lr"].integer) == ("number", False)
    # optional numbers can be left empty, which a number input cannot
    assert (by_name["max_steps"].kind, by_name["max_steps"].optional) == ("text", True)
    assert by_name["template"].kind == "text"
    from glmtune.plan.presets import PRESETS

    assert by_name["preset"].choices == ("none", *PRESETS)


def test_components_carry_the_schema():
    import gradio as gr

    by_name = {o.name: o for o in schema.options(cfg.TrainConfig)}
    quant = schema.component(by_name["quant"])
    assert isinstance(quant, gr.Dropdown) and quant.elem_id == "opt-quant"
    assert [c[1] for c in quant.choices] == list(cfg.QUANT_LEVELS)
    lora_r = schema.component(by_name["lora_r"], "x")
    assert isinstance(lora_r, gr.Number) and lora_r.value == 16 and lora_r.precision == 0
    assert lora_r.elem_id == "x-lora_r"
    assert isinstance(schema.component(by_name["fused"]), gr.Checkbox)
    steps = schema.component(by_name["max_steps"])
    assert isinstance(steps, gr.Textbox) and steps.value == ""


def _form(**changes):
    """Form values as the page sends them: every input, at its default unless changed."""
    values = {o.name: schema.form_value(cfg.TrainConfig, o.name, {})
              for o in schema.options(cfg.TrainConfig)}
    values.update(changes)
    return values


def test_only_changed_values_reach_the_command_line():
    form = _form(max_steps="12", batch_size=4.0, lr=0.01, fused=False, quant="none",
                 val_data="", save_total_limit="")
    changed = schema.changed(cfg.TrainConfig, form)
    assert changed == {"max_steps": 12, "batch_size": 4, "lr": 0.01, "fused": False,
                       "val_data": None, "save_total_limit": None}
    flags = schema.argv(cfg.TrainConfig, changed)
    assert flags == ["--val-data", "none", "--max-steps", "12", "--batch-size", "4",
                     "--lr", "0.01", "--no-fused", "--save-total-limit", "none"]
    # the flags mean what the form meant, through the real CLI parser
    from glmtune.cli import build_parser, config_from_args

    parsed = config_from_args(build_parser().parse_args(["train", *flags]), cfg.TrainConfig)
    assert parsed == schema.build(cfg.TrainConfig, form)
    assert (parsed.max_steps, parsed.batch_size, parsed.fused, parsed.resolved_val_data) == (
        12, 4, False, None)


def test_a_preset_fills_what_the_form_left_alone():
    config = schema.build(cfg.TrainConfig, _form(preset="fast", lora_r=4))
    assert (config.max_steps, config.batch_size, config.lora_r) == (20, 4, 4)


def test_every_bad_value_is_reported_at_once():
    with pytest.raises(ConfigError) as caught:
        schema.build(cfg.TrainConfig, _form(max_steps="many", batch_size=None, lora_dropout=2.0))
    message = str(caught.value)
    assert "max_steps: expected an integer, got 'many'" in message
    assert "batch_size: a value is required" in message
    with pytest.raises(ConfigError, match="lora_dropout"):
        schema.build(cfg.TrainConfig, _form(lora_dropout=2.0))


def test_an_empty_adapter_means_the_base_model():
    config = schema.build(cfg.ChatConfig, {"adapter": "", "model": "tiny-glm"})
    assert (config.adapter, config.model) == ("", "tiny-glm")


def test_a_reload_refills_the_form_from_the_jobs_settings():
    settings = {"max_steps": 12, "fused": False, "memory_limit": None}
    assert schema.form_value(cfg.TrainConfig, "max_steps", settings) == "12"
    assert schema.form_value(cfg.TrainConfig, "fused", settings) is False
    assert schema.form_value(cfg.TrainConfig, "memory_limit", settings) == ""
    assert schema.form_value(cfg.TrainConfig, "lora_r", settings) == 16


# ---------------------------------------------------------------- progress
def _run_dir(tmp_path):
    """An output directory as `glmtune train` writes it mid-run (last line half-written)."""
    out = tmp_path / "run"
    out.mkdir()
    records = [{"step": 0, "eval_loss": 7.2},
               {"step": 5, "epoch": 0.5, "loss": 5.0, "tokens_per_s": 100.0},
               {"step": 10, "epoch": 1.0, "loss": 4.0, "tokens_per_s": 120.0},
               {"step": 10, "eval_loss": 4.5}]
    (out / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records) + '{"step": 15, "lo', encoding="utf-8")
    (out / "memory.csv").write_text("time_s,rss_gb,system_available_gb\n0.0,0.4,20\n"
                                    "0.5,0.6,19.8\n1.0,0.5,19.9\n1.5,0.", encoding="utf-8")
    (out / jobs.LOG_FILE).write_text(
        "$ glmtune train\nINFO - training: 40 rows, 20 optimizer steps (1.00 epochs)\n"
        "train:  50%|#####     | 10/20\rtrain:  55%|#####     | 11/20\n", encoding="utf-8")
    return out


def test_progress_is_read_from_the_output_directory(tmp_path):
    out = _run_dir(tmp_path)
    log_text = progress.read_log(out, jobs.LOG_FILE)
    assert "10/20" not in log_text and "11/20" in log_text  # only a bar's last state
    state = progress.read_progress(out, log_text)
    assert state.points == [(0, 7.2, "validation"), (5, 5.0, "train"), (10, 4.0, "train"),
                            (10, 4.5, "validation")]
    assert (state.step, state.total_steps, state.loss, state.tokens_per_s) == (10, 20, 4.0, 120.0)
    assert (state.rss_gb, state.peak_rss_gb) == (0.5, 0.6)
    frame = state.frame().dropna()
    assert list(frame.columns) == ["step", "loss", "series"] and len(frame) == 4
    # both series exist from the first frame on (the plot fixes its series then)
    assert set(progress.read_progress(tmp_path).frame()["series"]) == {"train", "validation"}


def test_an_empty_directory_has_no_progress(tmp_path):
    state = progress.read_progress(tmp_path)
    assert state.points == [] and state.rss_gb is None and len(state.frame().dropna()) == 0


def test_failed_and_stopped_runs_are_read_from_the_log():
    log_text = ("INFO - x\nerror: invalid command-line flags (2 problem(s)):\n"
                "  - lr: must be > 0\n  - epochs: must be > 0\n")
    assert progress.last_error(log_text).splitlines() == [
        "invalid command-line flags (2 problem(s)):", "  - lr: must be > 0",
        "  - epochs: must be > 0"]
    assert progress.read_progress(__import__("pathlib").Path("/nonexistent"),
                                  "stopped early at step 7; resume").stopped_at == 7


def test_eta_from_the_pace_seen():
    job = jobs.Job(["x"], __import__("pathlib").Path("."))
    assert job.eta_seconds(100) is None
    job.seen = [(1000.0, 10), (1010.0, 20)]
    assert job.eta_seconds(100) == pytest.approx(80.0)
    assert progress.duration(80) == "1:20" and progress.duration(3725) == "1:02:05"


def test_the_page_view_of_a_finished_cli_run(tmp_path):
    """A run the page did not start (no job): shown from its directory alone."""
    from glmtune.webui.app import job_view

    out = _run_dir(tmp_path)
    (out / "adapter_config.json").write_text("{}")
    status, line, frame, _ = job_view(jobs.JobRegistry(), str(out), "en")
    assert status == f"Finished: adapter in {out}"
    assert "step 10 / 20" in line and "4 points plotted" in line and len(frame.dropna()) == 4
    status_zh, line_zh, _, _ = job_view(jobs.JobRegistry(), str(out), "zh")
    assert status_zh.startswith("已完成") and "已绘制 4 个点" in line_zh


# ------------------------------------------------------------------ labels
def test_both_label_sets_are_complete_and_take_the_same_values():
    en, zh = labels.LABELS["en"], labels.LABELS["zh"]
    assert set(en) == set(zh)
    fields_of = lambda text: {f[1] for f in string.Formatter().parse(text) if f[1]}
    for key in en:
        assert en[key].strip() and zh[key].strip(), key
        assert fields_of(en[key]) == fields_of(zh[key]), key
        assert en[key] != zh[key], f"{key} is not translated"


@pytest.mark.parametrize("header, expected", [
    ("zh-CN,zh;q=0.9,en;q=0.8", "zh"), ("en-US,en;q=0.9,zh-CN;q=0.8", "en"),
    ("fr-FR,zh-TW;q=0.5", "zh"), ("en;q=0.2,zh;q=0.8", "zh"), ("", "en"), (None, "en"),
    ("de", "en")])
def test_the_browsers_language_picks_the_labels(header, expected):
    assert labels.language(header) == expected


def test_labels_feed_gradio_i18n():
    import gradio as gr

    i18n = gr.I18n(**labels.LABELS)
    assert i18n.translations_dict["zh"]["tab_train"] == "训练"


# -------------------------------------------------------------------- jobs
SLEEPER = """
import signal, sys, time
def stop(*_):
    print("stopped early at step 3; checkpoint saved", flush=True)
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
print("child started", flush=True)
time.sleep(60)
"""


def test_one_job_at_a_time_and_stop_is_sigint(tmp_path):
    """A stand-in child (a real process) that answers SIGINT as `glmtune train` does."""
    registry = jobs.JobRegistry()
    command = [sys.executable, "-c", SLEEPER]
    job = registry.start(command, tmp_path / "out", budget_gb=2.0, settings={"max_steps": 3})
    _wait_for(lambda: "child started" in job.log_path.read_text().splitlines())
    assert job.running and job.settings == {"max_steps": 3}
    with pytest.raises(jobs.JobBusy, match=f"pid {job.pid}"):
        registry.start(command, tmp_path / "other")
    assert registry.stop()
    assert job.proc.wait(30) == 130 and not job.running
    assert "stopped early at step 3" in job.log_path.read_text()
    assert not registry.stop()
    from glmtune.webui.app import job_view

    status = job_view(registry, "ignored: the job's directory is shown", "en")[0]
    assert status == f"Stopped at step 3; a checkpoint is saved in {tmp_path / 'out'}. Resume continues."
    # the next job may start now; a resumed one appends to the same log
    again = registry.start([sys.executable, "-c", "print('again')"], tmp_path / "out",
                           append_log=True)
    assert again.proc.wait(30) == 0 and registry.job is again
    text = again.log_path.read_text()
    assert "stopped early" in text and text.rstrip().endswith("again")


def test_the_command_shown_is_the_cli_command():
    command = jobs.train_command(["--max-steps", "3", "--data", "my data.jsonl"])
    assert command[:4] == [sys.executable, "-m", "glmtune", "train"]
    assert jobs.shown(command) == "glmtune train --max-steps 3 --data 'my data.jsonl'"


def test_server_shutdown_stops_the_job(tmp_path):
    registry = jobs.JobRegistry()
    job = registry.start([sys.executable, "-c", SLEEPER], tmp_path)
    _wait_for(lambda: "child started" in job.log_path.read_text().splitlines())
    registry.shutdown(timeout=30)
    assert job.returncode == 130


def _wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.05)


# -------------------------------------------------------------------- chat
def test_chat_streams_the_answer_predictor_gives_and_keeps_history(adapter):
    """Real tiny-glm + adapter: the page's last chat state is exactly ``generate``'s answer,
    earlier turns are passed back as history, and the base model answers beside it."""
    from glmtune.infer.predict import Predictor
    from glmtune.webui.app import PredictorCache, history_pairs, stream_reply

    config = cfg.ChatConfig(adapter=str(adapter), max_new_tokens=12, threads=1).predict_config()
    with PredictorCache().use(config) as predictor:
        states = list(stream_reply(predictor, "你好", []))
        first = states[-1]
        assert first[-2] == {"role": "user", "content": "你好"}
        assert first[-1]["content"] == predictor.generate("你好")
        # the way Gradio hands the chat back: content as a list of parts
        returned = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
                    for m in first]
        assert history_pairs(returned) == [("你好", first[-1]["content"])]
        second = list(stream_reply(predictor, "再见", returned))[-1]
        assert second[-1]["content"] == predictor.generate("再见", [("你好", first[-1]["content"])])
        with predictor.base_model():
            base = list(stream_reply(predictor, "你好", []))[-1]
            assert base[-1]["content"] == predictor.generate("你好")
        assert isinstance(predictor, Predictor)


def test_the_command_binds_localhost_and_never_shares_by_default():
    from glmtune.cli import build_parser

    args = build_parser().parse_args(["webui"])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)
