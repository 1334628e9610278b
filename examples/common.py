"""What every example script shares: logging, the demo data, and clean error exits.

Not an example itself. The scripts import it as a sibling module (Python puts
a script's own directory first on ``sys.path``).
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

DEMO_DATA = "data/train_triplet.jsonl"
DEMO_VAL = "data/val_triplet.jsonl"


def setup_logging() -> None:
    """glmtune's progress lines on stderr, as the ``glmtune`` command shows them."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s - %(message)s")
    # the same library chatter the glmtune command hides: nothing a user can act on
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def ensure_demo_data(path: str) -> None:
    """Generate the synthetic triplet data the first time an example needs it."""
    if Path(path).exists() or path not in (DEMO_DATA, DEMO_VAL):
        return
    from glmtune.data import triplets

    train, val = triplets.write(Path(path).parent)
    print(f"generated the demo data: {train}, {val}", file=sys.stderr)


def run(main, argv=None) -> int:
    """Run ``main(argv)``; a mistake the user can fix is one line on stderr and exit 2."""
    from glmtune.errors import GlmtuneError

    setup_logging()
    try:
        return main(argv) or 0
    except GlmtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
