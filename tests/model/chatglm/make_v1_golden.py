"""Regenerate tests/model/chatglm/v1_golden.json with THUDM's own ChatGLM-6B code.

Not a test and not run by the suite: it needs a scratch environment with the
transformers THUDM's code was written for, and THUDM's four .py files (never part
of this repository; public copy: the HF repo THUDM/chatglm-6b, e.g. its GitHub mirror
greensheng/chatglm-6b):

    python3 -m venv /tmp/ref
    /tmp/ref/bin/pip install torch==2.13.0 transformers==4.33.3 sentencepiece==0.2.3
    /tmp/ref/bin/python tests/model/chatglm/make_v1_golden.py THUDM_DIR OUT.json

It builds the tiny ChatGLM-6B checkpoint of tests/fixtures/chatglm_layout.py (the same
bytes the tests build), puts THUDM's .py files beside it, and records what THUDM's
tokenizer and model (fp32 via .float(), and fp16 via .half()) compute on it.

Second use, checking an export: with THUDM's .py files in BASE (the checkpoint above),

    glmtune export --adapter LORA --model BASE --out MERGED
    /tmp/ref/bin/pip install peft==0.6.2
    /tmp/ref/bin/python tests/model/chatglm/make_v1_golden.py export MERGED BASE QUERY...

prints THUDM's greedy chat() answer to each QUERY (24 new tokens) from the merged model,
and from BASE + MERGED/adapter_original_layout under PEFT: each must equal
`glmtune predict --adapter LORA --prompt QUERY --max-new-tokens 24 --bf16 false`.
"""

import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

import torch
import transformers
from transformers import AutoModel, AutoTokenizer

from tests.fixtures.chatglm_layout import REMOTE_FILES, build_chatglm

TEXTS = ["你好", "Hello world, hello model!", "第一行\n第二行\n\n第三行", "a\tb\t\tc",
         "x    y  z" + " " * 90 + "w", "  两个空格开头", "def main():\n    for i in range(10):\n        print(i)\n",
         "世界🙂 unseen 字", "ChatGLM-6B是清华大学的模型。",
         "[Round 0]\n问：你好\n答：你好！我是人工智能助手。\n[Round 1]\n问：清华大学在哪里？\n答：",
         "a <eop> b<sop>c [MASK]  d", "[gMASK]<unk> x <pad>", "Hello , world . yes ! no ? it 's , I 'm"]
CHATS = [("你好", []), ("清华大学在哪里？", [("你好", "你好！我是人工智能助手。")]),
         ("def main():\n    return 0", [])]
PICK = list(range(0, 912, 37))  # logits compared at these ids (the tiny vocabulary has 912)


def build(path: Path, thudm: Path, **kwargs) -> Path:
    build_chatglm(path, 1, with_remote_files=False, **kwargs)
    for name in REMOTE_FILES:
        shutil.copy(thudm / name, path / name)
    return path


def chat_prompt(query, history):
    if not history:
        return query
    rounds = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
    return rounds + f"[Round {len(history)}]\n问：{query}\n答："


def main(thudm: Path, out: Path) -> None:
    torch.set_num_threads(1)
    work = out.parent
    res = {"how": "tests/model/chatglm/make_v1_golden.py", "transformers": transformers.__version__,
           "torch": torch.__version__, "texts": TEXTS, "pick": PICK}
    base = build(work / "v1-tiny", thudm)
    tok = AutoTokenizer.from_pretrained(str(base), trust_remote_code=True)
    res["ids"] = [tok(t)["input_ids"] for t in TEXTS]
    res["ids_plain"] = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    res["tokens"] = [tok.tokenize(t) for t in TEXTS]
    res["decoded"] = [tok.decode(ids) for ids in res["ids"]]
    res["decoded_skip"] = [tok.decode(ids, skip_special_tokens=True) for ids in res["ids"]]
    res["pair"] = tok("问题", "回答")["input_ids"]
    offset = build(work / "v1-tiny-offset", thudm, num_image_tokens=20000)
    tok_offset = AutoTokenizer.from_pretrained(str(offset), trust_remote_code=True)
    res["ids_offset"] = [tok_offset(t)["input_ids"] for t in TEXTS]
    res["decoded_offset"] = [tok_offset.decode(ids) for ids in res["ids_offset"]]

    model = AutoModel.from_pretrained(str(base), trust_remote_code=True).float().eval()

    def last_logits(m, texts):
        enc = tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            return enc, m(**enc).logits[:, -1, :].float()

    enc, logits = last_logits(model, [TEXTS[0]])
    res["logits_single"] = {"input_ids": enc["input_ids"].tolist(), "values": logits[0, PICK].tolist(),
                            "top5": torch.topk(logits[0], 5).indices.tolist()}
    enc, logits = last_logits(model, [TEXTS[9], TEXTS[0], TEXTS[6]])  # left-padded batch
    res["logits_batch"] = {"input_ids": enc["input_ids"].tolist(),
                           "position_ids": enc["position_ids"].tolist(),
                           "values": logits[:, PICK].tolist(),
                           "top5": torch.topk(logits, 5).indices.tolist()}
    # Training example as THUDM's ptuning main.py builds it: prompt [gMASK] <sop> answer <eop>.
    a = tok.encode("清华大学在哪里？", add_special_tokens=False)
    b = tok.encode("清华大学位于北京市海淀区。", add_special_tokens=False)
    ids = tok.build_inputs_with_special_tokens(a, b)
    labels = [-100] * (len(a) + 2) + ids[len(a) + 2:]
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
    res["train"] = {"input_ids": ids, "labels": labels, "loss": loss.item()}
    res["chat"] = []
    for query, history in CHATS:
        response, _ = model.chat(tok, query, history=history, do_sample=False, max_new_tokens=24)
        inputs = tok([chat_prompt(query, history)], return_tensors="pt")
        generated = model.generate(**inputs, do_sample=False, max_new_tokens=24)
        res["chat"].append({"query": query, "history": history, "response": response,
                            "new_ids": generated[0, inputs["input_ids"].shape[1]:].tolist()})
    model16 = AutoModel.from_pretrained(str(base), trust_remote_code=True).half().eval()
    enc, logits = last_logits(model16, [TEXTS[9]])
    res["logits_fp16"] = {"input_ids": enc["input_ids"].tolist(), "values": logits[0, PICK].tolist(),
                          "top5": torch.topk(logits[0], 5).indices.tolist()}
    out.write_text(json.dumps(res, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def check_export(merged: Path, base: Path, queries: list[str]) -> None:
    from peft import PeftModel

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(merged), trust_remote_code=True)
    models = {"merged": AutoModel.from_pretrained(str(merged), trust_remote_code=True),
              "base + adapter_original_layout": PeftModel.from_pretrained(
                  AutoModel.from_pretrained(str(base), trust_remote_code=True).float(),
                  str(merged / "adapter_original_layout"))}
    for name, model in models.items():
        model = model.float().eval()
        answers = [model.chat(tok, q, history=[], do_sample=False, max_new_tokens=24)[0]
                   for q in queries]
        print(json.dumps({name: answers}, ensure_ascii=False))


if __name__ == "__main__":
    if sys.argv[1] == "export":
        check_export(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
    else:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
