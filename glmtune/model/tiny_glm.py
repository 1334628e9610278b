"""``tiny-glm``: the embedded default model, built locally and deterministically.

No model hub is reachable where glmtune is developed and tested, so the
default model is built here from a spec in the package: a native transformers
GLM (``model_type: glm``, the GLM-4 architecture) with random weights from a
fixed seed, and a byte-level BPE tokenizer trained on bundled text (byte-level,
so any Chinese or English input encodes). Its base knows nothing: that is why
its defaults also train the embeddings and the LM head.

The result is an ordinary Hugging Face directory, cached under
``models/tiny-glm/`` and rebuilt only when the spec changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

from glmtune import atomic

log = logging.getLogger(__name__)

NAME = "tiny-glm"
SPEC_FILE = "glmtune-tiny.json"  # written last: its presence marks a complete build

SPEC = {
    "version": 1,
    "seed": 1234,
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 2048,
}

SPECIAL_TOKENS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]

# GLM-4's chat format, so tokenizer.apply_chat_template agrees with our own
# "glm4" template for users who format prompts themselves.
CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def default_dir() -> Path:
    return Path(os.environ.get("GLMTUNE_MODELS_DIR", "models")) / NAME


@lru_cache(maxsize=1)
def _training_text() -> tuple[str, ...]:
    """Bundled text plus the synthetic task's sentences, so the task's words get merges.

    The task's 1,000 rows (``glmtune data triplets --train 900 --val 100`` with
    seed 1234, prompt and response joined) are stored with the model rather
    than generated here: the model stage depends on nothing of the data stage.
    """
    assets = resources.files("glmtune.model").joinpath("assets")
    corpus = assets.joinpath("corpus.txt").read_text("utf-8")
    lines = [line for line in corpus.splitlines() if line.strip()]
    task = assets.joinpath("task_text.jsonl").read_text("utf-8")
    return tuple(lines + [json.loads(line) for line in task.splitlines()])


def _fingerprint(lines) -> str:
    digest = hashlib.sha256(json.dumps(SPEC, sort_keys=True).encode())
    for line in lines:
        digest.update(line.encode("utf-8"))
    return digest.hexdigest()[:16]


def is_tiny(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a tiny-glm build (a random base that knows nothing)."""
    return (Path(path) / SPEC_FILE).is_file()


def is_built(path: Path) -> bool:
    marker = path / SPEC_FILE
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text())["fingerprint"] == _fingerprint(_training_text())
    except (ValueError, KeyError):
        return False


def build_tokenizer(lines):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    # Each CJK character is its own pre-token, so merges stop at whole
    # characters: a model trained from scratch must learn to copy names out of
    # a sentence, which it cannot do if a frequent sentence is one opaque token.
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[\u3000-\u303f\u3400-\u9fff\uf900-\ufaff\uff00-\uffef]"),
                             behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=SPEC["vocab_size"], min_frequency=2,
                                  special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(lines, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:], padding_side="left")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build(path: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Build tiny-glm into ``path`` (default ``models/tiny-glm``) unless already current."""
    import torch
    from transformers import GlmConfig, GlmForCausalLM

    path = Path(path) if path is not None else default_dir()
    lines = _training_text()
    fingerprint = _fingerprint(lines)
    if not force and is_built(path):
        return path

    log.info("building %s into %s (random weights, seed %d)", NAME, path, SPEC["seed"])
    tokenizer = build_tokenizer(lines)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = GlmConfig(
        vocab_size=len(tokenizer),
        hidden_size=SPEC["hidden_size"], intermediate_size=SPEC["intermediate_size"],
        num_hidden_layers=SPEC["num_hidden_layers"],
        num_attention_heads=SPEC["num_attention_heads"],
        num_key_value_heads=SPEC["num_key_value_heads"], head_dim=SPEC["head_dim"],
        max_position_embeddings=SPEC["max_position_embeddings"],
        pad_token_id=eos, eos_token_id=[eos, tokenizer.convert_tokens_to_ids("<|user|>")],
        bos_token_id=None, tie_word_embeddings=False,
    )
    # Seed the global RNG only around construction, and restore it: building
    # must not change what a caller's later random numbers are.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SPEC["seed"])
        model = GlmForCausalLM(config)

    with atomic.staging_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SPEC_FILE).write_text(json.dumps({"spec": SPEC, "fingerprint": fingerprint},
                                                indent=2))
        atomic.replace_dir(tmp, path)
    return path
