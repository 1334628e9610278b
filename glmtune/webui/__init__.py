"""``glmtune webui``: a Gradio page over the same commands (``app.py`` builds it)."""
