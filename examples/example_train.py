"""A menu of the four examples: pick one by number.

    python examples/example_train.py            # asks
    echo 1 | python examples/example_train.py   # answers from a pipe

Any further flags are handed to the chosen example, e.g.
``echo 2 | python examples/example_train.py --max_steps 5``.
"""

from __future__ import annotations

import sys

import common

# number -> (what it does, example module, arguments it starts with)
MENU = {
    "1": ("train with a configuration written in Python", "train_pure_python", []),
    "2": ("train with the 'fast' preset", "train_with_config", ["--config", "fast"]),
    "3": ("extract triplets from demo sentences with the adapter", "inference_triplet", []),
    "4": ("evaluate the adapter on the validation triplets", "evaluate_triplet", []),
}


def choose(stdin=None) -> str | None:
    stdin = stdin or sys.stdin
    print("glmtune examples:")
    for number, (what, module, _) in MENU.items():
        print(f"  {number}. {what}  ({module}.py)")
    print("choose 1-4 (q quits): ", end="", flush=True)
    line = stdin.readline()
    if not stdin.isatty():
        print(line.strip())  # echo a piped answer, so the transcript reads like a session
    return line.strip().lower() or None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    choice = choose()
    if choice in (None, "q", "quit"):
        return 0
    if choice not in MENU:
        print(f"error: no example {choice!r}; choose one of {', '.join(MENU)}", file=sys.stderr)
        return 2
    what, module_name, first_args = MENU[choice]
    print(f"\n== {what} ==", flush=True)
    module = __import__(module_name)
    return module.main(first_args + argv)


if __name__ == "__main__":
    raise SystemExit(common.run(main))
