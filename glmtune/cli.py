"""The ``glmtune`` command line.

Flags are generated from the config dataclasses (``glmtune/config.py``), so
the CLI cannot drift from the YAML keys, the Makefile variables or the Python
API. Heavy libraries are imported inside the commands: ``glmtune --help``
must stay instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from dataclasses import fields

from glmtune import config as cfg
from glmtune.errors import ConfigError, GlmtuneError

log = logging.getLogger("glmtune")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per config field; only flags the user actually gives are set."""
    group = parser.add_argument_group(f"{cls.__name__} options (also YAML keys)")
    for f in fields(cls):
        base, _ = cfg.field_type(cls, f)
        default = f.default if f.default is not cfg.dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        if f.metadata.get("make"):
            help_text += f" [Make: {f.metadata['make']}]"
        help_text += f" (default: {default!r})"
        # argparse %-formats help strings
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))
        if base is bool:
            group.add_argument(cfg.cli_flag(f), action=argparse.BooleanOptionalAction, **kwargs)
        else:
            group.add_argument(cfg.cli_flag(f), metavar=f.name.upper(),
                               choices=f.metadata.get("choices"), **kwargs)


def config_from_args(args: argparse.Namespace, cls: type):
    """Defaults < YAML (--config) < Make variables (--from-make) < flags."""
    layers = []
    if getattr(args, "config", None):
        layers.append(cfg.load_yaml(args.config, cls))
    if getattr(args, "from_make", False):
        layers.append(cfg.from_make_environment(cls))
    names = {f.name for f in fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    values, problems = {}, []
    for name, value in given.items():
        values[name], problem = cfg.coerce(cls, name, value, f"flag {cfg.cli_flag(_field(cls, name))}")
        if problem:
            problems.append(problem)
    if problems:
        try:  # the flags that did parse are checked too, so one run shows every problem
            problems += cls(**{k: v for k, v in values.items() if k not in _bad(problems)}).problems()
        except TypeError:
            pass
        raise ConfigError(problems, "command-line flags")
    layers.append(values)
    if cls is cfg.TrainConfig:
        preset = next((layer["preset"] for layer in reversed(layers) if "preset" in layer), "none")
        return cls.from_preset(preset, *layers)
    return cfg.build_config(cls, *layers)


def _bad(problems: list[str]) -> set[str]:
    """Field names the problems are about (each problem starts with 'name:')."""
    return {p.split(":", 1)[0] for p in problems}


def _field(cls, name):
    return next(f for f in fields(cls) if f.name == name)


# ------------------------------------------------------------------ commands
def cmd_train(args) -> int:
    from glmtune.train import distributed
    from glmtune.train.recipe import train
    from glmtune.train.stopping import EXIT_CODES

    result = train(config_from_args(args, cfg.TrainConfig))
    if not distributed.from_environment().is_main:
        return 0  # rank 0 reports for everyone
    if result.interrupted:
        command = _resume_command(args.argv, distributed.from_environment().world,
                                  result.resume_flags)
        print(f"stopped early at step {result.steps}; resume with: {command}")
        return EXIT_CODES.get(result.interrupted, 1)
    if result.eval_losses:
        first, last = result.eval_losses[0][1], result.eval_losses[-1][1]
        print(f"validation loss: {first:.4f} -> {last:.4f}")
    print(f"adapter saved to {result.output_dir}")
    return 0


def _resume_command(argv: list[str], world: int, flags: str = "") -> str:
    """The command that continues a stopped run: the one given, with resume on (plus ``flags``)."""
    import os
    import shlex

    if "--from-make" in argv:  # started by `make train VAR=...`
        if flags:  # options Make has no variables for go through the glmtune command
            return f"glmtune train --from-make {flags} --resume auto  # with the same Make variables"
        given = [f"{var}={shlex.quote(os.environ[var])}" for var in cfg.make_variables(cfg.TrainConfig)
                 if os.environ.get(var) and var != "RESUME"]
        target = ["train"] if world == 1 else ["train-ddp", f"NPROC={world}"]
        return shlex.join(["make", *target]) + "".join(" " + g for g in given) + " RESUME=auto"
    # the same launch again (torchrun / accelerate started the processes of a larger run)
    launcher = ["glmtune"] if world == 1 else ["torchrun", f"--nproc_per_node={world}", "-m", "glmtune"]
    argv = argv + ([] if "--resume" in argv else ["--resume", "auto"])
    return shlex.join([*launcher, *argv]) + (f" {flags}" if flags else "")


def cmd_predict(args) -> int:
    config = config_from_args(args, cfg.PredictConfig)
    if config.file:
        from glmtune.infer.batch import batch_predict

        result = batch_predict(config)
        print(f"{result.answered} answered, {result.skipped} already answered earlier, "
              f"{result.total} prompts in {config.file}; answers in {result.out}")
        return 0
    from glmtune.infer.predict import predict

    answer = predict(config)
    print(answer)
    if config.out:
        log.info("prediction written to %s", config.out)
    return 0


def cmd_eval(args) -> int:
    from glmtune.evaluate.run import evaluate

    result = evaluate(config_from_args(args, cfg.EvalConfig))
    print(result.report)
    print(f"\npredictions, report and metrics written to {result.output_dir}")
    return 0


def cmd_chat(args) -> int:
    from glmtune.infer.chat import run_chat
    from glmtune.infer.predict import Predictor

    config = config_from_args(args, cfg.ChatConfig)
    run_chat(Predictor(config.predict_config()))
    return 0


def cmd_export(args) -> int:
    from glmtune.infer.export import TOLERANCE, export

    result = export(config_from_args(args, cfg.ExportConfig))
    print(f"verified: merged logits equal base + adapter logits on a {result.probe_tokens}-token "
          f"probe prompt (max |difference| {result.max_abs_diff:.2e} <= {TOLERANCE:g}, float32)")
    print(f"merged model (safetensors + tokenizer) saved to {result.out}")
    return 0


def cmd_serve(args) -> int:
    from glmtune.serve import serve

    serve(config_from_args(args, cfg.ServeConfig))
    return 0


def cmd_plan(args) -> int:
    """What `glmtune train` would do here, without loading the model."""
    import json

    from glmtune.model import load
    from glmtune.plan import hardware, plan_for_model, presets, report

    if args.list_presets:
        print(presets.table())
        return 0
    config = config_from_args(args, cfg.TrainConfig)
    if args.processes < 1:
        raise ConfigError([f"processes: must be a positive integer, got {args.processes}"],
                          "command-line flags")
    hw = hardware.detect()
    source = load.resolve(config.model)
    preset_note = presets.pick(hw)[1] if config.preset == "auto" else None
    plan, final, _ = plan_for_model(config, hw, source, processes=args.processes)
    if args.env:
        print(_env_file(hw, plan, final, preset_note))
        return 0
    if args.json:
        print(json.dumps({"hardware": hardware.describe(hw).splitlines(), "preset": preset_note,
                          "plan": plan.to_dict(), "config": final.to_dict()}, indent=2,
                         ensure_ascii=False))
        return 0
    print(report(hw, plan, final, preset_note, processes=args.processes))
    return 0


def cmd_monitor(args) -> int:
    from pathlib import Path

    from glmtune.train.monitor import follow

    out = Path(args.output_dir)
    if not out.is_dir():
        raise GlmtuneError(f"{out}: no run here yet (start one with `make train`, or pass "
                           "--output-dir)")
    try:
        return follow(out, args.interval, once=args.once)
    except KeyboardInterrupt:
        return 0


def cmd_webui(args) -> int:
    from glmtune.webui.app import serve

    serve(args.host, args.port, share=args.share)
    return 0


def _env_file(hw, plan, final, preset_note) -> str:
    """A .env for docker compose / make, as the CPU seed's setup wrote it."""
    from glmtune.plan import hardware

    lines = ["# written by `glmtune plan --env` (make env) for this machine:",
             *(f"#   {line}" for line in hardware.describe(hw).splitlines()),
             f"MODEL={final.model}",
             f"PRESET={final.preset}",
             f"QUANT_LEVEL={final.quant}",
             f"NUM_THREADS={plan.threads}",
             f"MEMORY_LIMIT={plan.budget_bytes / hardware.GB:.1f}" if plan.budget_bytes else "MEMORY_LIMIT=",
             "# a Hugging Face mirror for slow or blocked downloads, e.g. https://hf-mirror.com",
             "HF_ENDPOINT=",
             "# where downloaded models are cached",
             "HF_HOME="]
    if preset_note:
        lines.insert(len(hardware.describe(hw).splitlines()) + 1, f"#   {preset_note}")
    return "\n".join(lines)


def cmd_data_triplets(args) -> int:
    from glmtune.data import triplets

    for n, name in ((args.train, "--train"), (args.val, "--val")):
        if n < 1:
            raise ConfigError([f"{name}: must be a positive integer, got {n}"], "command-line flags")
    train_path, val_path = triplets.write(args.out, n_train=args.train, n_val=args.val, seed=args.seed)
    print(f"wrote {args.train} rows to {train_path}")
    print(f"wrote {args.val} rows to {val_path}")
    return 0


def cmd_make_vars(args) -> int:
    """The Makefile variables, derived from the schema (used by `make help`)."""
    seen = {}
    for cls in (cfg.TrainConfig, cfg.PredictConfig, cfg.EvalConfig, cfg.ChatConfig,
                cfg.ExportConfig, cfg.ServeConfig):
        for var, name in cfg.make_variables(cls).items():
            seen.setdefault(var, (name, _field(cls, name).metadata["help"]))
    for var, (name, help_text) in seen.items():
        print(f"  {var:<24} {help_text} (--{name.replace('_', '-')})")
    return 0


# ------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from glmtune.data import triplets  # plain Python: keeps --help fast

    parser = argparse.ArgumentParser(
        prog="glmtune", description="LoRA / QLoRA fine-tuning for ChatGLM-family models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p, cls, func):
        """The options of ``cls`` (after any the command has of its own), run by ``func``."""
        p.add_argument("--config", metavar="FILE.yaml", help="read options from a YAML file")
        p.add_argument("--from-make", action="store_true", help=argparse.SUPPRESS)
        add_config_arguments(p, cls)
        p.set_defaults(func=func)

    with_config(sub.add_parser("train", help="fine-tune a LoRA adapter"), cfg.TrainConfig, cmd_train)

    p = sub.add_parser("plan", help="show the hardware, the settings a run would use and its "
                                    "predicted peak memory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--env", action="store_true", help="print a .env file for this machine")
    p.add_argument("--list-presets", action="store_true", help="print the preset table")
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="plan for N training processes (devices) on this kind of machine; with "
                        "--strategy fsdp or zero3 each holds 1/N of the weights (default: 1)")
    with_config(p, cfg.TrainConfig, cmd_plan)

    # the commands whose options are exactly their config's fields
    for name, cls, func, help_text in (
            ("predict", cfg.PredictConfig, cmd_predict,
             "answer a prompt (or a --file of prompts) with a trained adapter"),
            ("eval", cfg.EvalConfig, cmd_eval,
             "score an adapter on held-out data (triplet P/R/F1, or ROUGE / BLEU)"),
            ("chat", cfg.ChatConfig, cmd_chat, "talk to the model with an adapter, multi-turn"),
            ("export", cfg.ExportConfig, cmd_export, "merge an adapter into its base model and save it"),
            ("serve", cfg.ServeConfig, cmd_serve,
             "an OpenAI-compatible API over the base model and its adapters")):
        with_config(sub.add_parser(name, help=help_text), cls, func)

    p = sub.add_parser("monitor", help="follow a running job's loss and memory")
    p.add_argument("--output-dir", default=cfg.DEFAULT_OUTPUT_DIR,
                   help=f"the run's output directory (default: {cfg.DEFAULT_OUTPUT_DIR})")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between updates")
    p.add_argument("--once", action="store_true", help="print one line and exit")
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("webui", help="a web page for the whole job: train with live loss and "
                                     "memory, chat, evaluate, export")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument("--share", action="store_true",
                   help="also open a public Gradio share link (off unless given)")
    p.set_defaults(func=cmd_webui)

    data = sub.add_parser("data", help="data utilities").add_subparsers(
        dest="data_command", required=True, metavar="DATA_COMMAND")
    p = data.add_parser("triplets", help="write the synthetic triplet-extraction data set")
    p.add_argument("--out", default="data", help="output directory (default: data)")
    p.add_argument("--train", type=int, default=triplets.DEFAULT_TRAIN_ROWS,
                   help="training rows (default: %(default)s)")
    p.add_argument("--val", type=int, default=triplets.DEFAULT_VAL_ROWS,
                   help="validation rows (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    p.set_defaults(func=cmd_data_triplets)

    p = sub.add_parser("config", help="show configuration helpers")
    p.add_argument("--make-vars", action="store_true", required=True,
                   help="list the Makefile variables and the options they set")
    p.set_defaults(func=cmd_make_vars)
    return parser


def _setup_logging(debug: bool) -> None:
    class TqdmHandler(logging.StreamHandler):
        """Log lines printed above the progress bar instead of through it."""

        def emit(self, record):
            try:
                from tqdm import tqdm

                tqdm.write(self.format(record), file=sys.stderr)
            except Exception:  # logging must never kill a run
                self.handleError(record)

    # Library chatter that says nothing actionable to a user: bitsandbytes
    # failing to fetch an optional kernel from the hub, peft calling a
    # deprecated transformers property, DeepSpeed announcing the CPU it falls
    # back to whenever transformers imports it (a filter, because DeepSpeed
    # resets its logger's level when it creates it).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").addFilter(
        lambda record: "Setting accelerator to CPU" not in record.getMessage())
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s - %(message)s"))
    root = logging.getLogger("glmtune")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])  # what the user typed
    _setup_logging(args.debug)
    try:
        return args.func(args)
    except GlmtuneError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
