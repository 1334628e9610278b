"""The planning stage: what the machine has (``hardware``), named settings
(``presets``), what a run will cost (``estimate``) and the settings a run
uses, with the reasons (``planner``).

It sits between the config and everything that loads a model or data, and
imports nothing of them.
"""

from glmtune.plan.planner import (
    Plan,
    halve_batch,
    make_plan,
    memory_budget,
    plan_for_model,
    predict_step,
    report,
)

__all__ = ["Plan", "halve_batch", "make_plan", "memory_budget", "plan_for_model", "predict_step",
           "report"]
