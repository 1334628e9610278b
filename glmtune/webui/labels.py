"""Every word the page shows, once per language.

Static labels go to Gradio's own i18n (``gr.I18n``): the browser's language
picks the set (Chinese for a ``zh`` browser) and the page's Settings panel
switches it. Messages built on the server (job status, errors) use the same
sets, chosen from the request's ``Accept-Language``.

Option names on the Train / Evaluate / Export tabs are the config's YAML keys
in both languages: they are what a user types in a YAML file or on the CLI.
"""

from __future__ import annotations

LABELS: dict[str, dict[str, str]] = {
    "en": {
        "title": "glmtune: LoRA fine-tuning for ChatGLM-family models",
        "tab_train": "Train",
        "tab_chat": "Chat",
        "tab_eval": "Evaluate",
        "tab_export": "Export",
        "model": "Model: tiny-glm, a local directory or a hub id",
        "data_path": "Training data (path)",
        "data_upload": "…or upload a data file",
        "data_check": "Check data",
        "data_preview": "First rows",
        "more_options": "More options",
        "plan_button": "Show plan",
        "plan": "Plan and predicted peak memory (nothing loaded yet)",
        "start": "Start",
        "stop": "Stop (saves a checkpoint)",
        "resume": "Resume",
        "job_status": "Job",
        "progress": "Progress",
        "loss_plot": "Loss (train / validation)",
        "log": "Log",
        "adapter": "Adapter directory ('' for the base model)",
        "compare_base": "Side by side with the base model",
        "chat_adapter": "With the adapter",
        "chat_base": "Base model",
        "message": "Message",
        "send": "Send",
        "clear": "Clear history",
        "chat_settings": "Model and generation",
        "eval_button": "Run evaluation",
        "eval_summary": "Scores",
        "eval_relations": "Per relation",
        "eval_report": "Report",
        "export_button": "Merge and save",
        "export_result": "Result",
        # server-side messages (str.format)
        "msg_no_job": "No job yet: pick model and data, check the plan, press Start.",
        "msg_running": "Running (pid {pid}): {out}",
        "msg_finished": "Finished: adapter in {out}",
        "msg_stopped": "Stopped at step {step}; a checkpoint is saved in {out}. Resume continues.",
        "msg_failed": "Failed (exit code {code}): {error}",
        "msg_stopped_early": "Stopped before the first step (exit code {code}): nothing to resume.",
        "msg_busy": "A job is already running (pid {pid}, {out}); stop it first: one job per server.",
        "msg_started": "Started: {command}",
        "msg_stopping": "Stop requested: the run saves a checkpoint after this step.",
        "msg_not_running": "No job is running.",
        "msg_data_ok": "{path}: {rows} rows, format {format}",
        "msg_progress": "step {step} / {total} · epoch {epoch} · loss {loss} · {tps} tokens/s · "
                        "RSS {rss} GB (peak {peak}) of a {budget} GB budget · ETA {eta} · "
                        "{points} points plotted",
        "msg_waiting": "waiting for the first logged step…",
        "msg_exported": "Merged model saved to {out} (verified: max |logit difference| {diff:.1e})",
        "msg_eval_done": "{n} examples; predictions and report in {out}",
        "msg_loading": "loading the model…",
    },
    "zh": {
        "title": "glmtune：ChatGLM 系列模型的 LoRA 微调",
        "tab_train": "训练",
        "tab_chat": "对话",
        "tab_eval": "评测",
        "tab_export": "导出",
        "model": "模型：tiny-glm、本地目录或 Hub 模型名",
        "data_path": "训练数据（路径）",
        "data_upload": "…或上传数据文件",
        "data_check": "检查数据",
        "data_preview": "前几行",
        "more_options": "更多选项",
        "plan_button": "查看计划",
        "plan": "计划与预测峰值内存（尚未加载任何东西）",
        "start": "开始",
        "stop": "停止（保存检查点）",
        "resume": "继续",
        "job_status": "任务",
        "progress": "进度",
        "loss_plot": "损失（训练 / 验证）",
        "log": "日志",
        "adapter": "适配器目录（留空则用基座模型）",
        "compare_base": "与基座模型并排对比",
        "chat_adapter": "加载适配器",
        "chat_base": "基座模型",
        "message": "消息",
        "send": "发送",
        "clear": "清空历史",
        "chat_settings": "模型与生成",
        "eval_button": "运行评测",
        "eval_summary": "得分",
        "eval_relations": "按关系",
        "eval_report": "报告",
        "export_button": "合并并保存",
        "export_result": "结果",
        "msg_no_job": "尚无任务：选择模型和数据，查看计划，然后点击“开始”。",
        "msg_running": "运行中（pid {pid}）：{out}",
        "msg_finished": "已完成：适配器在 {out}",
        "msg_stopped": "已在第 {step} 步停止；检查点已保存在 {out}。点击“继续”接着训练。",
        "msg_failed": "失败（退出码 {code}）：{error}",
        "msg_stopped_early": "在第一步之前已停止（退出码 {code}）：没有可继续的检查点。",
        "msg_busy": "已有任务在运行（pid {pid}，{out}）；请先停止它：每个服务只运行一个任务。",
        "msg_started": "已开始：{command}",
        "msg_stopping": "已请求停止：本步结束后保存检查点。",
        "msg_not_running": "没有正在运行的任务。",
        "msg_data_ok": "{path}：{rows} 行，格式 {format}",
        "msg_progress": "第 {step} / {total} 步 · 第 {epoch} 轮 · 损失 {loss} · {tps} tokens/s · "
                        "内存 {rss} GB（峰值 {peak}），预算 {budget} GB · 预计剩余 {eta} · "
                        "已绘制 {points} 个点",
        "msg_waiting": "等待第一个记录的步…",
        "msg_exported": "合并后的模型已保存到 {out}（已校验：最大 logit 差 {diff:.1e}）",
        "msg_eval_done": "共 {n} 条；预测和报告在 {out}",
        "msg_loading": "正在加载模型…",
    },
}

LANGUAGES = tuple(LABELS)


def language(accept_language: str | None) -> str:
    """The label set for an ``Accept-Language`` header: the first listed language we have."""
    ranked = []
    for position, part in enumerate((accept_language or "").split(",")):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        if params.strip().startswith("q="):
            try:
                quality = float(params.strip()[2:])
            except ValueError:
                quality = 0.0
        ranked.append((-quality, position, tag.strip().lower().split("-")[0]))
    for _, _, tag in sorted(ranked):
        if tag in LABELS:
            return tag
    return "en"


def text(lang: str, key: str, **values) -> str:
    return LABELS.get(lang, LABELS["en"])[key].format(**values)
