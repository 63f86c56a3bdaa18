"""The instruct recipe (examples/instruct.yaml, README "Instruct models") end to end on tiny models,
as a user runs it: `raydistill run` on the shipped file, its models and data replaced by `--set`.

A Qwen2 chat teacher (ChatML template in its tokenizer, embedding table padded 40 rows past the
tokenizer, as released Qwen checkpoints are) scored by a real vLLM engine; a *pretrained* Qwen2
student (trained briefly here first) whose table is the tokenizer's size, smaller than the
teacher's; chat data; bf16, gradient checkpointing and packing as the recipe sets them. Then the
exported student answers a chat request through Ray Serve with the official openai client.

    PYTHONPATH=$PWD python -m pytest -q tests/test_instruct.py      # ~4 min on 2 CPUs
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from orchestrator.driver import tiny
from tests.conftest import write_jsonl
from tests.orchestrator.test_chat import CHATML

PADDED_ROWS = 40
RECIPE = Path(__file__).resolve().parents[1] / "examples" / "instruct.yaml"


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_teacher, texts):
    """{"teacher", "student", "data", "root", "rows"}: the chat teacher, a pretrained student of
    its family with a smaller embedding table, and chat records from real text pieces."""
    from orchestrator.teacher_info import load_tokenizer

    root = tmp_path_factory.mktemp("instruct")
    tok = load_tokenizer(tiny_teacher)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    teacher, student = root / "teacher", root / "student"
    for d in (teacher, student):
        tok.save_pretrained(str(d))
    model = tiny.build_model(tiny.family_config("qwen2", len(tok) + PADDED_ROWS, layers=2,
                                                max_positions=512), seed=0)
    tiny.sharpen(model, scale=6.0)
    model.save_pretrained(str(teacher), safe_serialization=True)
    # the "pretrained" student: 1 layer, one row per token, 30 next-token steps on other texts
    small = tiny.build_model(tiny.family_config("qwen2", len(tok), layers=1, max_positions=512),
                             seed=3)
    ids = [t for text in texts[60:100] for t in tok(text)["input_ids"]]
    tiny.train_lm(small, ids, max_steps=30, batch=4, seq=64, lr=3e-3)
    small.save_pretrained(str(student), safe_serialization=True)
    rows = []
    for i, t in enumerate(texts[:48]):
        turns = [{"role": "user", "content": f"Continue this code:\n{t[:80]}"},
                 {"role": "assistant", "content": t[80:320]}]
        rows.append({"id": f"chat{i}", "messages": turns})
    data = write_jsonl(root / "chats.jsonl", rows)
    return {"teacher": str(teacher), "student": str(student), "data": data, "root": root,
            "rows": len(tok)}


def test_the_instruct_recipe_runs_end_to_end(pair, ray_session, capsys):
    import torch
    from openai import OpenAI
    from transformers import AutoModelForCausalLM

    from orchestrator.driver.cli import main
    from orchestrator.teacher_info import load_tokenizer
    from orchestrator.winners import ServedModel
    from serve import app
    from tests.conftest import serve_settings

    out = pair["root"] / "runs"
    sets = {  # the models and data; the rest only fits the recipe to 2 CPUs and a minute
        "teacher.model": pair["teacher"], "student.model": pair["student"],
        "data.path": pair["data"], "output_dir": str(out),
        "teacher.num_gpus": 0, "teacher.num_cpus": 0.5, "teacher.kv_cache_gib": 1,
        "teacher.max_model_len": 512, "teacher.k": 8, "data.max_length": 256,
        "data.eval_fraction": 0.25, "train.use_gpu": "false", "train.num_workers": 1,
        "train.batch_size": 4, "train.grad_accum": 1, "train.max_tokens_per_batch": 1024,
        "train.max_steps": 8, "train.eval_every": 4, "train.log_every": 2,
        "train.warmup_steps": 1, "train.lr": 1e-3, "train.report_prompts": 2,
        "train.report_new_tokens": 8,
    }
    argv = ["run", str(RECIPE)] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    code = main(argv)
    text = " ".join(capsys.readouterr().out.split())
    assert code == 0, text
    (report_path,) = out.glob("experiments/*/report.json")
    report = json.loads(report_path.read_text())
    settings = report["settings"]
    # the recipe's own settings reached the run
    assert settings["train"]["packing"] and settings["train"]["precision"] == "bf16"
    assert settings["train"]["gradient_checkpointing"] and settings["student"]["model"]
    kd, hard = report["students"]["kd"], report["students"]["hard"]
    assert kd["steps"] == hard["steps"] == 8
    history = report["history"]["kd"]
    # the teacher's 40 padded ids are folded into the tail of a student with fewer rows, and
    # only assistant tokens were distilled: fewer scored positions than tokens in the held-out
    assert any(h["folded_mass"] > 0 for h in history)
    assert all(0 <= h["padding_share"] < 1 for h in history if "padding_share" in h)
    held = settings["captures"]["held-out"]
    assert 0 < kd["positions"] < held["tokens"] - held["rows"]
    assert report["completions"] and "teacher" in report["completions"][0]
    md = report_path.with_suffix(".md").read_text()
    assert "Packing (train.packing) removed" in md and "## Greedy completions" in md
    assert "<|im_start|>" in report["completions"][0]["prompt"]  # chat-rendered, as taught
    # the student is a plain HF directory with the teacher's chat template and a smaller table
    model_dir = kd["model_dir"]
    student = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert student.get_output_embeddings().weight.shape[0] == pair["rows"]
    assert load_tokenizer(model_dir).chat_template == CHATML
    # ... and answers a chat request through Ray Serve
    url = app.start([ServedModel(id="instruct", path=model_dir)], serve_settings())
    try:
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="instruct", messages=[{"role": "user", "content": "Continue: def f("}],
            max_tokens=6, temperature=0)
        assert reply.choices[0].message.role == "assistant"
        assert reply.usage.completion_tokens >= 1
    finally:
        app.stop()
    shutil.rmtree(out, ignore_errors=True)
