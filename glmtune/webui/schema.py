"""Config dataclass -> form fields, and form values -> config and command line.

The page has no list of options of its own: each field of ``TrainConfig``
(and of ``EvalConfig``, ``ChatConfig``, ``ExportConfig``) becomes one input
whose kind, choices, default and help come from the field, as the CLI's
flags do (``cli.add_config_arguments``). Only values the user changed from
the field default are passed on, so a preset still fills in the rest.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

from glmtune import config as cfg
from glmtune.errors import ConfigError

MIN_WIDTH = 220  # pixels: narrower inputs wrap to the next line


@dataclass(frozen=True)
class Option:
    name: str
    kind: str             # "checkbox", "dropdown", "number" or "text"
    help: str
    default: Any
    choices: tuple[str, ...] | None = None
    integer: bool = False
    optional: bool = False


def _choices(cls: type, f) -> tuple[str, ...] | None:
    if f.metadata.get("choices"):
        return tuple(f.metadata["choices"])
    if cls is cfg.TrainConfig and f.name == "preset":
        # the preset names live in the table the validator checks against
        from glmtune.plan.presets import PRESETS

        return ("none", *PRESETS)
    return None


def options(cls: type, skip: tuple[str, ...] = ()) -> list[Option]:
    """One Option per field of ``cls`` (dataclass order), except those in ``skip``."""
    found = []
    for f in fields(cls):
        if f.name in skip:
            continue
        base, optional = cfg.field_type(cls, f)
        default = None if f.default is MISSING else f.default
        choices = _choices(cls, f)
        # an optional number is a text box: a number input cannot be left empty (unset)
        kind = ("checkbox" if base is bool else "dropdown" if choices
                else "number" if base in (int, float) and not optional else "text")
        found.append(Option(f.name, kind, f.metadata.get("help", ""), default, choices,
                            integer=base is int, optional=optional))
    return found


def component(option: Option, prefix: str = "opt"):
    """The Gradio input for one option (labelled with its YAML key, help below it);
    its element id is ``prefix-name`` (one prefix per tab: ids are unique in a page)."""
    import gradio as gr

    common = {"label": option.name, "info": option.help,
              "elem_id": f"{prefix}-{option.name}", "min_width": MIN_WIDTH}
    if option.kind == "checkbox":
        return gr.Checkbox(value=bool(option.default), **common)
    if option.kind == "dropdown":
        return gr.Dropdown(choices=list(option.choices), value=option.default, **common)
    if option.kind == "number":
        return gr.Number(value=option.default, precision=0 if option.integer else None, **common)
    return gr.Textbox(value="" if option.default is None else str(option.default),
                      placeholder="unset" if option.optional else None, **common)


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def changed(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The values that differ from the field defaults, converted to the field types.

    Raises ConfigError listing every value that does not convert.
    """
    defaults = {o.name: o for o in options(cls)}
    result, problems = {}, []
    for name, value in values.items():
        option = defaults[name]
        if option.kind == "text" and isinstance(value, str):
            value = value.strip()
        if _blank(value) and option.optional:
            value = None
        elif value is None or (_blank(value) and option.kind == "number"):
            problems.append(f"{name}: a value is required (form)")
            continue
        if value is not None:
            value, problem = cfg.coerce(cls, name, value, "form")
            if problem:
                problems.append(problem)
                continue
        if value != option.default:
            result[name] = value
    if problems:
        raise ConfigError(problems, "form")
    return result


def build(cls: type, values: dict[str, Any]):
    """A validated config from form values (for TrainConfig: defaults < preset < form)."""
    overrides = changed(cls, values)
    if cls is cfg.TrainConfig:
        return cls.from_preset(overrides.get("preset", "none"), overrides)
    return cfg.build_config(cls, overrides)


def form_value(cls: type, name: str, settings: dict[str, Any]) -> Any:
    """What input ``name`` shows for a run with ``settings`` (the changed values it
    was started with): its setting, else the field default."""
    option = next(o for o in options(cls) if o.name == name)
    value = settings.get(name, option.default)
    if option.kind == "text":
        return "" if value is None else str(value)
    return value


def argv(cls: type, overrides: dict[str, Any]) -> list[str]:
    """Command-line flags that give ``overrides`` (the same flags `glmtune train --help` lists)."""
    by_name = {f.name: f for f in fields(cls)}
    out: list[str] = []
    for name, value in overrides.items():
        flag = cfg.cli_flag(by_name[name])
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, "none" if value is None else str(value)]
    return out
