"""Docker packaging, tested without a Docker engine.

No image is built or pulled here. What can be proven natively is: the compose
file parses; each service's command is a make target that runs real glmtune
commands with the settings the container would get from .env.template; the
Dockerfile installs through the same script as `make setup`; `make env` and
the `docker-*` targets do what they say (with a stand-in for docker compose);
and `docker stop`'s SIGTERM reaches glmtune exactly once through make.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from glmtune import cli
from glmtune import config as cfg

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
TEMPLATE = REPO / ".env.template"
DOCKERFILE = REPO / "Dockerfile"
# Read by huggingface_hub, not by glmtune: the only .env keys that are not Make variables.
HF_VARS = {"HF_ENDPOINT", "HF_HOME"}
# Marked "old" on every make call below, so that no test ever runs `make setup`.
STAMP = ".venv/.installed-stamp"
# What a user has to add for a service to mean anything (its usage line says so).
USER_INPUT = {"batch-predict": {"FILE": "data/prompts.txt"}}
CONFIG_OF = {"train": cfg.TrainConfig, "plan": cfg.TrainConfig, "predict": cfg.PredictConfig,
             "eval": cfg.EvalConfig, "chat": cfg.ChatConfig, "export": cfg.ExportConfig,
             "serve": cfg.ServeConfig}


def make_variables() -> set[str]:
    return {var for cls in set(CONFIG_OF.values()) for var in cfg.make_variables(cls)}


def read_env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not KEY=VALUE: {line!r}"
            pairs[key.strip()] = value.strip()
    return pairs


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR-default}."""
    def one(match):
        name, colon, default = match.group(1), match.group(2), match.group(3)
        value = env.get(name)
        if value is None or (colon and value == ""):
            return default if default is not None else ""
        return value

    return re.sub(r"\$\{(\w+)(?:(:?)-([^}]*))?\}", one, text)


def services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))["services"]


def service_environment(service: dict) -> dict[str, str]:
    """The environment a service's container starts with, .env being the template."""
    template = read_env_file(TEMPLATE)
    return {key: interpolate(str(value), template)
            for key, value in (service.get("environment") or {}).items()}


def volume_targets(service: dict) -> set[str]:
    template = read_env_file(TEMPLATE)
    return {interpolate(v, template).split(":")[1] for v in service["volumes"]}


def run_make(*args: str, cwd: Path, env: dict[str, str] | None = None, **popen):
    """The repository's Makefile, run from ``cwd`` in a clean environment (no
    variables leaking in from a `make test` around this)."""
    clean = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(cwd)),
             "PYTHONPATH": str(REPO), **(env or {})}
    argv = ["make", "--no-print-directory", "-f", str(REPO / "Makefile"), "-o", STAMP, *args]
    if popen:
        return subprocess.Popen(argv, cwd=cwd, env=clean, **popen)
    return subprocess.run(argv, cwd=cwd, env=clean, capture_output=True, text=True, timeout=120)


RECORDER = """\
import json, os, sys
with open(os.environ["RECORD"], "a", encoding="utf-8") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "env": dict(os.environ)}) + "\\n")
"""


def recorded_calls(tmp_path: Path, *make_args: str, env: dict[str, str]) -> list[dict]:
    """Run make with a stand-in that records what it would have passed to glmtune."""
    recorder, record = tmp_path / "record.py", tmp_path / "calls.jsonl"
    recorder.write_text(RECORDER)
    work = tmp_path / "work"
    work.mkdir()
    done = run_make(*make_args, f"GLMTUNE={sys.executable} {recorder}", cwd=work,
                    env={**env, "RECORD": str(record)})
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


# ------------------------------------------------------------- compose file
def test_compose_has_the_services_and_a_gpu_profile():
    found = services()
    assert {"setup", "train", "predict", "batch-predict"} <= set(found)
    gpu = {name for name, s in found.items() if "gpu" in (s.get("profiles") or [])}
    assert gpu >= {"train-gpu", "predict-gpu"}
    for name in gpu:
        devices = found[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d.get("capabilities", []) for d in devices), name
        assert found[name]["command"] == found[name.removesuffix("-gpu")]["command"], name
    for name, service in found.items():
        assert {"/app/data", "/app/models"} <= volume_targets(service), name
    # `docker stop` leaves a checkpoint; starting the service again must continue it.
    assert service_environment(found["train"])["RESUME"] == "auto"
    assert found["train"]["stop_grace_period"]


def test_compose_environment_is_make_variables_and_the_template():
    known = make_variables() | HF_VARS
    template = set(read_env_file(TEMPLATE))
    for name, service in services().items():
        env = set(service.get("environment") or {})
        assert not env - known, f"{name}: not Make variables: {sorted(env - known)}"
        # The host's HF_HOME is mounted; inside, HF_HOME must stay the volume's path.
        assert env >= template - {"HF_HOME"} and "HF_HOME" not in env, name


@pytest.mark.parametrize("name", sorted(services()))
def test_service_command_runs_real_glmtune_commands(name, tmp_path, monkeypatch):
    service = services()[name]
    command = service["command"]
    # Exec form: a shell in between would swallow docker stop's SIGTERM.
    assert isinstance(command, list) and command[0] in ("make", "glmtune"), command
    env = {**service_environment(service), **USER_INPUT.get(name.removesuffix("-gpu"), {})}
    if command[0] == "make":
        calls = recorded_calls(tmp_path, *command[1:], env=env)
    else:
        calls = [{"argv": command[1:], "env": env}]
    assert calls, f"{command} runs no glmtune command"
    for call in calls:
        argv = call["argv"]
        subcommand = [a for a in argv if not a.startswith("-")][:2]
        helped = subprocess.run([sys.executable, "-m", "glmtune", *subcommand, "--help"],
                                capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        assert helped.returncode == 0, helped.stderr
        # The exact arguments parse, and the settings the container would get
        # (the template's, through make) make a valid configuration.
        args = cli.build_parser().parse_args(argv)
        if argv[0] in CONFIG_OF:
            for var in make_variables():
                monkeypatch.delenv(var, raising=False)
            for key, value in call["env"].items():
                if key in make_variables():
                    monkeypatch.setenv(key, value)
            cli.config_from_args(args, CONFIG_OF[argv[0]])


def _compose() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_docker_compose_config_accepts_the_file_with_the_template():
    compose = _compose()
    if compose is None:
        pytest.skip("no docker compose here (neither the plugin nor docker-compose); "
                    "the file is still checked with PyYAML by the other tests")
    done = subprocess.run([*compose, "--env-file", str(TEMPLATE), "-f", str(COMPOSE_FILE),
                           "--profile", "gpu", "config"], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")},
                          timeout=60)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)["services"]
    assert set(resolved) == set(services())
    for name, service in services().items():
        assert resolved[name]["command"] == service["command"], name
        env = {k: "" if v is None else str(v) for k, v in resolved[name]["environment"].items()}
        assert env == service_environment(service), name


# ------------------------------------------------------------- .env template
def test_env_template_has_the_knobs_and_only_real_settings():
    template = read_env_file(TEMPLATE)
    assert set(template) >= {"MODEL", "MEMORY_LIMIT", "NUM_THREADS", "PRESET", "QUANT_LEVEL",
                             "HF_ENDPOINT", "HF_HOME"}
    unknown = set(template) - make_variables() - HF_VARS
    assert not unknown, f"not Make variables / config fields: {sorted(unknown)}"
    settings = cfg.from_make_environment(cfg.TrainConfig, template)
    cfg.TrainConfig.from_preset(settings.get("preset", "none"), settings)


# ------------------------------------------------------------- Dockerfile
def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_dockerfile_installs_through_the_make_setup_script():
    steps = _instructions(DOCKERFILE)
    runs = [arg for op, arg in steps if op == "RUN"]
    assert any("scripts/install.sh" in run for run in runs)
    assert any(re.search(r"\bmake setup\b", run) for run in runs)
    # Every Python package comes through the script, so image and .venv agree.
    assert not any(re.search(r"pip3? install", run) for run in runs)
    dry = subprocess.run(["make", "-n", "-B", "setup"], cwd=REPO, capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"]})
    assert "scripts/install.sh" in dry.stdout, dry.stdout + dry.stderr
    # The build arguments pick CPU or CUDA torch through the variables the script reads.
    args = {arg.split("=")[0] for op, arg in steps if op == "ARG"}
    script = (REPO / "scripts" / "install.sh").read_text()
    for var in ("TORCH_SPEC", "TORCH_INDEX_URL"):
        assert var in args and var in script
    for name, service in services().items():
        assert set(service["build"].get("args", {})) <= args, name


def test_image_runs_as_a_user_with_data_models_and_cache_in_volumes():
    steps = _instructions(DOCKERFILE)
    users = [arg for op, arg in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("WORKDIR", "/app") in steps
    volumes = set(json.loads([arg for op, arg in steps if op == "VOLUME"][-1]))
    hf_home = re.search(r"HF_HOME=(\S+)", " ".join(arg for op, arg in steps if op == "ENV"))
    assert hf_home and {"/app/data", "/app/models", hf_home.group(1)} <= volumes
    for service in services().values():
        assert hf_home.group(1) in volume_targets(service)
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {"data", "models", ".env", ".venv"} <= ignored


# ------------------------------------------------------------- make env
def test_make_env_writes_the_env_file_and_never_replaces_one_unasked(tmp_path, tiny_model):
    folder = tmp_path / "conf"
    folder.mkdir()
    target = folder / "my.env"
    make = ("env", f"ENV_FILE={target}", f"GLMTUNE={sys.executable} -m glmtune")

    done = run_make(*make, f"MODEL={tiny_model}", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    written = read_env_file(target)
    assert set(written) == set(read_env_file(TEMPLATE))  # what the template documents
    assert written["MODEL"] == str(tiny_model) and int(written["NUM_THREADS"]) >= 1
    assert os.listdir(folder) == ["my.env"]

    target.write_text("MODEL=my-edits\n")
    refused = run_make(*make, f"MODEL={tiny_model}", cwd=tmp_path)
    assert refused.returncode != 0 and "FORCE=1" in refused.stdout + refused.stderr
    assert target.read_text() == "MODEL=my-edits\n"

    failed = run_make(*make, f"MODEL={tmp_path / 'no-such-model'}", "FORCE=1", cwd=tmp_path)
    assert failed.returncode != 0 and "no-such-model" in failed.stderr
    assert target.read_text() == "MODEL=my-edits\n" and os.listdir(folder) == ["my.env"]

    forced = run_make(*make, f"MODEL={tiny_model}", "FORCE=1", cwd=tmp_path)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert read_env_file(target)["MODEL"] == str(tiny_model)

    dry = run_make("-n", "env", cwd=tmp_path)
    assert '".env"' in dry.stdout  # the default destination


# ------------------------------------------------------------- docker-* targets
FAKE_COMPOSE = """\
import json, os, sys
with open(os.environ["RECORD"], "a", encoding="utf-8") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "uid": os.environ.get("USER_ID"),
                        "gid": os.environ.get("GROUP_ID")}) + "\\n")
"""


def _docker_target(tmp_path: Path, *args: str) -> list[dict]:
    fake, record = tmp_path / "compose.py", tmp_path / "compose.jsonl"
    fake.write_text(FAKE_COMPOSE)
    record.unlink(missing_ok=True)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    done = run_make(*args, f"DOCKER_COMPOSE={sys.executable} {fake}", cwd=work,
                    env={"RECORD": str(record)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (work / "data").is_dir() or args[0] == "docker-build"
    return [json.loads(line) for line in record.read_text().splitlines()]


def _run_call(argv: list[str]) -> tuple[list[str], dict[str, str], str]:
    """(options before `run`, -e pairs, service) of a `compose ... run --rm ...` call."""
    at = argv.index("run")
    before, rest = argv[:at], argv[at + 1:]
    assert rest[0] == "--rm"
    passed, i = {}, 1
    while rest[i] == "-e":
        key, _, value = rest[i + 1].partition("=")
        passed[key], i = value, i + 2
    assert i == len(rest) - 1, rest
    return before, passed, rest[-1]


def test_docker_targets_build_then_run_the_services(tmp_path):
    prompt = 'say "hi" & `go`; it\'s'  # make itself expands $, natively too
    build, run = _docker_target(tmp_path, "docker-train", "NUM_EPOCHS=3", f"PROMPT={prompt}")
    assert build["argv"] == ["build", "train"]
    assert int(build["uid"]) > 0 and int(build["gid"]) > 0  # never a root container user
    before, passed, service = _run_call(run["argv"])
    # Command-line variables reach the container verbatim; make's own stay behind.
    assert (before, passed, service) == ([], {"NUM_EPOCHS": "3", "PROMPT": prompt}, "train")

    _, run = _docker_target(tmp_path, "docker-predict")
    assert _run_call(run["argv"]) == ([], {}, "predict")
    _, run = _docker_target(tmp_path, "docker-predict", "FILE=data/p.txt")
    assert _run_call(run["argv"]) == ([], {"FILE": "data/p.txt"}, "batch-predict")

    build, run = _docker_target(tmp_path, "docker-train", "GPU=1")
    assert build["argv"] == ["--profile", "gpu", "build", "train-gpu"]
    assert _run_call(run["argv"]) == (["--profile", "gpu"], {}, "train-gpu")
    (only,) = _docker_target(tmp_path, "docker-build", "GPU=1")
    assert only["argv"][-1] == "train-gpu"


# ------------------------------------------------------------- docker stop
SIGNAL_STUB = """\
import os, signal, sys

def write(name, text):
    with open(os.environ[name] + ".tmp", "w") as f:
        f.write(text)
    os.replace(os.environ[name] + ".tmp", os.environ[name])

# Taken with sigtimedwait, not a handler: a SIGTERM is counted however late it comes, for as
# long as the stub lives. SIGUSR1 is the test's word that nothing upstream can send more.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
write("READY", f"{os.getpid()} " + " ".join(sys.argv[1:]))
got = 0
while True:
    # the limit only ends a stub orphaned by a failed run
    taken = signal.sigtimedwait({signal.SIGTERM, signal.SIGUSR1}, 120)
    if taken is None or taken.si_signo == signal.SIGUSR1:
        break
    got += 1
    write("GOT", str(got))
if signal.SIGTERM in signal.sigpending():  # SIGUSR1 (10) is handed out before SIGTERM (15)
    got += 1
write("GOT", str(got))
sys.exit(143 if got else 1)
"""


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])  # the name may hold spaces and ")"


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if _parent(int(entry.name)) == pid:
                    found.add(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass  # gone while we looked
    return found


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _not_waiting_on(top: int, leaf: int) -> str:
    """Which process from ``top`` down to ``leaf``'s parent is not blocked in wait() on its
    only child, the next one towards ``leaf``; "" when none: then none of them runs, so none
    can send ``leaf`` anything more until ``leaf`` exits."""
    child = leaf
    while True:
        try:
            parent = _parent(child)
        except (OSError, ValueError, IndexError):
            return f"process {child} is gone"
        if parent <= 1:
            return f"process {leaf} does not descend from make ({top})"
        where, children = _read(f"/proc/{parent}/wchan"), _children(parent)
        if where != "do_wait" or children != {child}:
            return (f"{_read(f'/proc/{parent}/comm')} ({parent}) is in {where or '?'} "
                    f"with children {sorted(children)}")
        if parent == top:
            return ""
        child = parent


def _poll(done, what: str, make, log: Path, why=lambda: "", unseen=lambda: "") -> None:
    """Until ``done()``; else fail saying ``what`` (and ``why()``) when make ends first or
    after 30 s (a bound on a failing run: nothing here is timed). ``unseen()``: a reason to
    skip instead, when what was waited for is something this machine cannot show."""
    deadline = time.monotonic() + 30
    while not done():
        if make.poll() is not None:
            pytest.fail(f"{what}: make ended ({make.returncode}): {log.read_text()}")
        if time.monotonic() > deadline:
            if unseen():
                pytest.skip(unseen())
            pytest.fail(f"{what} within 30 s: {why()}")
        time.sleep(0.02)


@pytest.mark.skipif(not Path("/proc/self/wchan").exists(),
                    reason="tells a process waiting for its child from /proc (Linux)")
def test_sigterm_to_make_reaches_glmtune_exactly_once(tmp_path):
    # In the container tini hands docker stop's SIGTERM to make (PID 1's only
    # child); make must pass it on to glmtune, and only once: glmtune takes a
    # second signal as "abort without saving a checkpoint".
    stub = tmp_path / "glmtune_stub.py"
    stub.write_text(SIGNAL_STUB)
    ready, got, log = tmp_path / "ready", tmp_path / "got", tmp_path / "make.log"
    assert " " not in f"{sys.executable}{stub}"  # make must exec it directly, as in the image
    with open(log, "w") as out:  # a file, not a pipe: an orphaned stub cannot hold it open
        make = run_make("train", f"GLMTUNE={sys.executable} {stub}", "DATA=mine.jsonl",
                        cwd=tmp_path, env={"READY": str(ready), "GOT": str(got)},
                        stdout=out, stderr=subprocess.STDOUT)
    glmtune = None
    try:
        _poll(ready.exists, "glmtune did not start", make, log)
        pid, argv = ready.read_text().split(" ", 1)
        glmtune = int(pid)
        assert argv == "train --from-make"

        # make forwards from its signal handler, then waits for its child again: once each
        # process on the way to glmtune is back in wait(), all have had their say
        def settled():
            return not _not_waiting_on(make.pid, glmtune)

        def unsettled():
            return _not_waiting_on(make.pid, glmtune)

        _poll(settled, "make is not waiting on glmtune", make, log, why=unsettled,
              unseen=lambda: "" if _read(f"/proc/{make.pid}/wchan") not in ("", "0") else
              "this kernel does not say where a process sleeps (/proc/PID/wchan reads 0)")
        make.send_signal(signal.SIGTERM)
        _poll(got.exists, "the SIGTERM did not reach glmtune", make, log)
        _poll(settled, "make did not go back to waiting on glmtune after the SIGTERM", make, log,
              why=unsettled)
        os.kill(glmtune, signal.SIGUSR1)
        make.wait(timeout=30)
        assert got.read_text() == "1", "glmtune got more than one SIGTERM"
        assert make.returncode != 0  # docker sees the stop, not a success
    finally:  # a failed run leaves no stub or make behind
        if glmtune is not None and str(stub) in _read(f"/proc/{glmtune}/cmdline"):
            with contextlib.suppress(ProcessLookupError):  # it may end meanwhile
                os.kill(glmtune, signal.SIGKILL)
        if make.poll() is None:
            make.kill()
        make.wait(timeout=30)
