"""glmtune: LoRA / QLoRA fine-tuning for ChatGLM-family models on the hardware people own.

Python API::

    import glmtune
    config = glmtune.TrainConfig(epochs=3, lora_r=8)
    glmtune.train(config)                  # one call

    tuner = glmtune.FineTuner(config)      # or step by step, as in the QLoRA guide
    tuner.setup_model_and_tokenizer()
    tuner.prepare_datasets()
    tuner.train()

Names are imported lazily so that ``import glmtune`` (and ``glmtune --help``)
stays fast: torch and transformers load only when a run needs them.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "TrainConfig": "glmtune.config",
    "PredictConfig": "glmtune.config",
    "FineTuner": "glmtune.train.recipe",
    "train": "glmtune.train.recipe",
    "Predictor": "glmtune.infer.predict",
    "EvalConfig": "glmtune.config",
    "ChatConfig": "glmtune.config",
    "ExportConfig": "glmtune.config",
    "ServeConfig": "glmtune.config",
    "Sampling": "glmtune.infer.predict",
    "GlmtuneError": "glmtune.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'glmtune' has no attribute {name!r}")
