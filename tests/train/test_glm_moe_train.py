"""Train -> predict / chat -> export on tiny random GLM-4.5 (glm4_moe) and GLM-4.7-Flash
(glm4_moe_lite) models, and two-process FSDP / ZeRO-3 runs on the MoE."""

from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors.torch import load_file

from glmtune.config import PredictConfig, TrainConfig
from glmtune.infer.chat import run_chat
from glmtune.infer.predict import Answer, Predictor, _Visible
from glmtune.train.recipe import FineTuner

pytestmark = pytest.mark.slow

QUESTION = "2+2?"
REASONING, ANSWER = "add", "four"


@pytest.fixture(scope="module", params=["glm4_moe", "glm4_moe_lite"])
def trained(request, glm_models, tmp_path_factory):
    """An adapter that learned one answer with its reasoning: ``<think>add</think>four``."""
    work = tmp_path_factory.mktemp(f"train-{request.param}")
    row = {"messages": [{"role": "user", "content": QUESTION},
                        {"role": "assistant", "content": f"<think>{REASONING}</think>{ANSWER}"}]}
    data = work / "train.jsonl"
    data.write_text("\n".join(json.dumps(row) for _ in range(8)) + "\n")
    config = TrainConfig(model=str(glm_models[request.param]), data=str(data), val_data="",
                         output_dir=str(work / "out"), max_steps=100, batch_size=8, lr=1e-2,
                         train_embeddings="true", bf16="false", threads=1, logging_steps=10,
                         save_steps=1000)
    FineTuner(config).train()
    return request.param, glm_models[request.param], work / "out"


def test_adapter_targets_no_router_and_no_routed_experts(trained):
    _, _, out = trained
    keys = load_file(out / "adapter_model.safetensors").keys()
    assert any("shared_experts" in k for k in keys) and any("layers.0.mlp." in k for k in keys)
    assert not any(".mlp.gate." in k or ".mlp.experts." in k for k in keys)
    assert json.loads((out / "adapter_config.json").read_text())["target_parameters"] is None


def test_predict_strips_the_reasoning_unless_asked(trained):
    _, _, out = trained
    answer = Predictor(PredictConfig(adapter=str(out), prompt=QUESTION, bf16="false",
                                     threads=1, max_new_tokens=12))
    assert answer.generate(QUESTION) == ANSWER
    shown = Predictor(PredictConfig(adapter=str(out), bf16="false", threads=1, max_new_tokens=12,
                                    show_thinking=True))
    assert shown.generate(QUESTION) == f"<think>{REASONING}</think>\n{ANSWER}"
    assert shown.generate_batch([QUESTION, QUESTION]) == [shown.generate(QUESTION)] * 2
    # chat streams the same answers, reasoning held back
    stdout = io.StringIO()
    run_chat(answer, stdin=io.StringIO(QUESTION + "\n"), stdout=stdout, stderr=io.StringIO(),
             interactive=False)
    assert stdout.getvalue() == ANSWER + "\n"


def test_export_reloads_in_plain_transformers_with_equal_logits(trained, run_cli, tmp_path):
    from transformers import AutoModelForCausalLM

    kind, base, out = trained
    merged_dir = tmp_path / "merged"
    code, _, err = run_cli("export", "--adapter", out, "--out", merged_dir, "--threads", 1)
    assert code == 0, err
    predictor = Predictor(PredictConfig(adapter=str(out), bf16="false", threads=1))
    ids = torch.tensor([predictor.prompt_ids(QUESTION)])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert merged.config.model_type == kind
    with torch.no_grad():
        expected = predictor.model(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=0)
        plain = AutoModelForCausalLM.from_pretrained(base).eval()(input_ids=ids).logits
    assert (plain - expected).abs().max() > 1e-2  # the adapter changed the model


def _visible(pieces: list[str]) -> tuple[list[str], str]:
    """What a client is sent of an answer arriving in ``pieces``, and the final answer."""
    sent: list[str] = []
    hidden = _Visible(1, "glm45", False, lambda _, piece: sent.append(piece))
    for piece in pieces:
        hidden.feed(0, piece)
    final = hidden.finish(0, Answer("".join(pieces), 1, len(pieces), "stop"))
    return sent, final.text


def test_streamed_reasoning_is_held_back_piece_by_piece():
    sent, final = _visible(["\n<th", "ink>ad", "d</thi", "nk>\nfo", "ur"])
    assert "".join(sent).strip() == final == ANSWER
    # trailing whitespace waits for what follows it (the final answer is stripped)
    assert _visible(["plain ", "answer"]) == (["plain", " answer"], "plain answer")
    sent, final = _visible(["<think>a</think>", "\n", "four", " and", " five"])
    assert sent == ["four", " and", " five"] and final == "four and five"
    sent, final = _visible(["<think>cut off"])
    assert "".join(sent) == final == "<think>cut off"


@pytest.fixture(scope="module")
def one_process_moe_run(glm_models, triplet_dir, tmp_path_factory):
    """The reference: the same 6 steps on one process, micro-batch 4 (= 2 x 2)."""
    from tests.train.test_distributed import run

    work = tmp_path_factory.mktemp("moe-one")
    return run(work, glm_models["glm4_moe"], triplet_dir / "train_triplet.jsonl", work / "one",
               nproc=1, batch=4)


@pytest.mark.parametrize("strategy", [
    "fsdp", pytest.param("zero3", marks=pytest.mark.skipif(
        __import__("importlib").util.find_spec("deepspeed") is None, reason="no DeepSpeed"))])
def test_two_process_sharded_run_on_the_moe(strategy, one_process_moe_run, glm_models,
                                           triplet_dir, tmp_path):
    """FSDP2 / ZeRO-3 over two gloo processes: the gathered adapter equals a one-process run's."""
    from tests.train.test_distributed import run

    two = run(tmp_path, glm_models["glm4_moe"], triplet_dir / "train_triplet.jsonl",
              tmp_path / "two", nproc=2, batch=2, strategy=strategy)
    single = load_file(one_process_moe_run / "rank0.safetensors")
    sharded = load_file(two / "adapter_model.safetensors")
    assert sharded.keys() == single.keys()
    assert not any(".mlp.gate." in k for k in sharded)
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], atol=2e-3, rtol=0)
