"""Chat and completion data end to end on tiny real teachers: captures whose shards mark exactly
the assistant / completion tokens (the transformers backend, and one real vLLM engine on a second
family), a completion capture that trains with only completion tokens counted, chat prompts in
sample mode, and the capture fingerprint following what changes the shards.

The teachers' tokenizer is the session's tiny BPE plus ChatML's turn markers as special tokens;
the Llama teacher keeps the chat template in its tokenizer_config.json, the Qwen2 teacher has none
(its captures pass it as data.chat_template)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import capture_config, train_config, write_jsonl
from orchestrator import chat
from orchestrator.data import Record
from tests.orchestrator.test_chat import CHATML


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, tiny_teacher):
    """{"llama": dir (template in its tokenizer), "qwen2": dir (no template), "template": file}."""
    from orchestrator.driver import tiny
    from orchestrator.teacher_info import load_tokenizer

    root = tmp_path_factory.mktemp("chat-teachers")
    out = {}
    for family, own_template in (("llama", True), ("qwen2", False)):
        tok = load_tokenizer(tiny_teacher)
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = CHATML if own_template else None
        tok.save_pretrained(str(root / family))
        model = tiny.build_model(tiny.family_config(family, len(tok), layers=2,
                                                    max_positions=256), seed=1)
        tiny.sharpen(model, scale=6.0)
        model.save_pretrained(str(root / family), safe_serialization=True)
        out[family] = str(root / family)
    (root / "chatml.jinja").write_text(CHATML)
    out["template"] = str(root / "chatml.jinja")
    return out


def _chats(texts, n=24):
    """Chat records from real text pieces: a user turn, an assistant turn, sometimes two rounds."""
    rows = []
    for i, t in enumerate(texts[:n]):
        turns = [{"role": "user", "content": f"Continue this code:\n{t[:60]}"},
                 {"role": "assistant", "content": t[60:200]}]
        if i % 3 == 0:
            turns += [{"role": "user", "content": "And then?"},
                      {"role": "assistant", "content": t[200:260]}]
        rows.append({"id": f"c{i}", "messages": turns})
    return rows


@pytest.fixture(scope="module")
def chat_capture(teachers, texts, ray_session, tmp_path_factory):
    """A finished score-mode capture of chat data (hf backend, the Llama teacher's own template),
    with a held-out split and behaviour-cloning samples (the teacher's own replies)."""
    from orchestrator.driver.pipeline import capture

    root = tmp_path_factory.mktemp("chat-capture")
    rows = _chats(texts)
    data = write_jsonl(root / "chat.jsonl", rows)
    cfg = capture_config(root, teachers["llama"], data, **{
        "data.eval_fraction": 0.25, "train.baselines": "[bc]", "train.bc_prompt_tokens": 96,
        "teacher.max_new_tokens": 16})
    capture(cfg)
    return {"out": cfg.output_dir, "rows": {r["id"]: r for r in rows}, "cfg": cfg}


def _expected(model: str, row: dict, **kw) -> tuple[list[int], np.ndarray]:
    """The record's tokens and learned-token mask, from `orchestrator.chat` with the teacher's
    tokenizer and the template."""
    from orchestrator.shards.format import spans_to_mask
    from orchestrator.teacher_info import load_tokenizer

    tok = load_tokenizer(model)
    messages = tuple((m["role"], m["content"]) for m in row["messages"])
    enc = chat.encode(Record(row["id"], "", messages=messages), tok, template=CHATML, **kw)
    return enc.ids, spans_to_mask(enc.spans, len(enc.ids))


def test_chat_capture_stores_the_assistant_tokens_mask(chat_capture, teachers):
    """Every stored sequence holds the rendered conversation's tokens and exactly its assistant
    tokens' mask — long ones split into pieces (main) or truncated (held-out), the mask with
    them."""
    from orchestrator.shards.format import read_shards
    from orchestrator.teacher_info import load_tokenizer

    tok = load_tokenizer(teachers["llama"])
    end = tok.convert_tokens_to_ids("<|im_end|>")
    split = 0
    for kind in ("main", "heldout"):
        rows = list(read_shards(chat_capture["out"], capture=kind))
        assert rows
        for r in rows:
            sid, _, part = r["sample_id"].partition("#p")
            split += bool(part)
            j = int(part or 0)
            ids, mask = _expected(teachers["llama"], chat_capture["rows"][sid])
            assert r["input_ids"].tolist() == ids[j * 128:(j + 1) * 128]
            np.testing.assert_array_equal(r["loss_mask"], mask[j * 128:(j + 1) * 128])
            assert r["loss_mask"][1:].any()
            if len(ids) <= 128:  # whole: one end of turn learned per assistant message
                turns = chat_capture["rows"][sid]["messages"]
                assert (r["input_ids"][r["loss_mask"]] == end).sum() == len(turns) // 2
                # (the newline after it may be merged into the reply's first token)
                assert tok.decode(r["input_ids"][:r["loss_mask"].argmax()]).rstrip(
                    "\n").endswith("<|im_start|>assistant")
    assert split, "no long conversation was split"


def test_behaviour_cloning_prompts_are_the_conversations_before_the_last_reply(chat_capture,
                                                                               teachers):
    from orchestrator.shards.format import read_shards

    rows = list(read_shards(chat_capture["out"], capture="bc"))
    assert rows and all(r["sample_id"].endswith("#s0") for r in rows)
    for r in rows:
        row = chat_capture["rows"][r["sample_id"].removesuffix("#s0")]
        prompt, _ = _expected(teachers["llama"], row, mode="sample")
        room = 128 - (128 - 96 - 1)  # bc replies fill the context after bc_prompt_tokens
        assert r["input_ids"][:r["prompt_len"]].tolist() == prompt[-room:]
        assert r["loss_mask"].all()  # the reply is all the teacher's: every sampled token


def test_the_heldout_of_a_sample_mode_capture_measures_every_prompt_token(chat_capture):
    from dataclasses import replace

    from orchestrator.shards.plan import heldout_config

    cfg = chat_capture["cfg"]
    sample = replace(cfg, teacher=replace(cfg.teacher, mode="sample"))
    assert heldout_config(sample).data.train_on_prompt is True
    assert heldout_config(cfg).data.train_on_prompt is False


def test_the_fingerprint_follows_template_train_on_prompt_and_format_only_where_they_count(
        teachers, chat_capture, texts, tmp_path):
    from dataclasses import replace

    from orchestrator.shards.plan import scan_captures
    from orchestrator.teacher_info import inspect_teacher

    cfg = chat_capture["cfg"]
    info = inspect_teacher(teachers["llama"])

    def fingerprint(c):
        return scan_captures(c, info)[0].fingerprint

    base = fingerprint(cfg)
    other = tmp_path / "other.jinja"
    other.write_text(CHATML.replace("<|im_end|>\n", "<|im_end|>\n\n"))
    data = cfg.data
    assert fingerprint(replace(cfg, data=replace(data, train_on_prompt=True))) != base
    assert fingerprint(replace(cfg, data=replace(data, chat_template=str(other)))) != base
    assert fingerprint(replace(cfg, data=replace(data, chat_template=teachers["template"]))) \
        == base  # the same template text, from a file
    assert fingerprint(replace(cfg, data=replace(data, format="chat"))) == base
    plain = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts[:8]])
    text_cfg = replace(cfg, data=replace(data, path=plain))
    assert fingerprint(replace(text_cfg, data=replace(text_cfg.data, train_on_prompt=True,
                                                     chat_template=str(other)))) \
        == fingerprint(text_cfg)  # text records: neither changes a token


def test_completion_capture_trains_on_completion_tokens_only(teachers, texts, ray_session,
                                                              tmp_path):
    """Only completion tokens (and EOS) carry KD labels and hard labels: in the shards, in the
    training batches, and in the held-out evaluation the report shows."""
    from orchestrator.driver import pipeline
    from orchestrator.kd.batches import collate
    from orchestrator.shards.format import read_shards
    from orchestrator.teacher_info import load_tokenizer

    rows = [{"id": f"p{i}", "prompt": f"# {t[:40]}\n", "completion": t[40:160]}
            for i, t in enumerate(texts[:32])]
    data = write_jsonl(tmp_path / "completions.jsonl", rows)
    cfg = train_config(tmp_path / "out", teachers["llama"], data, **{
        "data.eval_fraction": 0.25, "train.baselines": "[]", "train.num_workers": 0,
        "train.max_steps": 4, "train.eval_every": 4, "train.log_every": 2})
    pipeline.capture(cfg)
    tok = load_tokenizer(teachers["llama"])
    by_id = {r["id"]: r for r in rows}
    samples = list(read_shards(cfg.output_dir))
    for s in samples:
        prompt = tok(by_id[s["sample_id"]]["prompt"])["input_ids"]
        assert s["loss_mask"].tolist() == [False] * len(prompt) + \
            [True] * (len(s["input_ids"]) - len(prompt))
        assert s["input_ids"][-1] == tok.eos_token_id
    batch = collate(samples[:8])
    learned = sum(int(s["loss_mask"][1:].sum()) for s in samples[:8])
    assert int((batch.targets >= 0).sum()) == int(batch.kd_mask.sum()) == learned
    report = json.loads((Path(pipeline.train(cfg)).parent / "report.json").read_text())
    held = list(read_shards(cfg.output_dir, capture="heldout"))
    assert report["students"]["kd"]["positions"] == sum(int(s["loss_mask"][1:].sum())
                                                        for s in held)
    assert report["students"]["kd"]["steps"] == 4


def test_sample_mode_writes_the_assistant_turn_of_a_chat_prompt(teachers, texts, ray_session,
                                                                tmp_path):
    """Chat prompts get the generation prompt (the final assistant turn dropped); prompt_len
    marks where the teacher's reply starts; the reply stops at EOS or the template's end of
    turn. The template comes from data.chat_template (the Qwen2 teacher has none)."""
    from orchestrator.driver.pipeline import capture
    from orchestrator.shards.format import read_shards

    rows = _chats(texts, n=6)
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = capture_config(tmp_path, teachers["qwen2"], data, **{
        "teacher.mode": "sample", "teacher.max_new_tokens": 8,
        "data.chat_template": teachers["template"]})
    capture(cfg)
    got = list(read_shards(cfg.output_dir))
    assert len(got) == 6
    for r in got:
        prompt, _ = _expected(teachers["qwen2"], next(x for x in rows
                                                     if f"{x['id']}#s0" == r["sample_id"]),
                              mode="sample")
        prompt = prompt[-(128 - 8):]  # a long prompt keeps its end (room for the reply)
        assert r["prompt_len"] == len(prompt) and r["input_ids"][:len(prompt)].tolist() == prompt
        assert 0 < len(r["input_ids"]) - len(prompt) <= 8


def test_a_chat_reply_stops_at_end_of_turn(teachers):
    """The actor passes EOS and the template's end-of-turn token as stop tokens; the backend
    ends a reply at any of them (the same seed samples the same tokens, so a stop only cuts)."""
    from actors.teacher import TeacherWorker, stable_seed
    from orchestrator.shards.specs import CaptureSpec, EngineSpec

    spec = EngineSpec(backend="hf", model=teachers["qwen2"], revision=None, mode="sample",
                      max_k=4, dtype="float32", scoring="hidden", memory_fraction=0.1,
                      kv_cache_gib=None, max_model_len=None, tensor_parallel_size=1,
                      chunk_rows=64, batch_tokens=1024, seed=0)
    worker = TeacherWorker(spec)
    end = worker.tokenizer.convert_tokens_to_ids("<|im_end|>")
    asked = []
    real = worker.backend.sample

    def recording(*args, **kw):  # the real backend, its stop tokens noted
        asked.append(kw["eos_id"])
        return real(*args, **kw)

    worker.backend.sample = recording
    capture = CaptureSpec(output_dir="", mode="sample", k=4, max_length=128, long_text="split",
                          shard_meta={}, max_new_tokens=12, seed=3, chat_template=CHATML)
    record = Record("r", "", messages=(("user", "def f():"),))
    (_, free), = worker.label([record], capture)
    assert asked == [sorted({worker.tokenizer.eos_token_id, end})]
    reply = free.input_ids[free.prompt_len:].tolist()
    stop = reply[4]
    cut = worker.backend.sample([free.input_ids[:free.prompt_len].tolist()], k=4, n=1,
                                temperature=1.0, top_p=1.0, max_new_tokens=12,
                                seeds=[stable_seed(3, "r")], eos_id=[end, stop])[0][0]
    assert cut.input_ids[cut.prompt_len:].tolist() == reply[:reply.index(stop) + 1]


@pytest.mark.slow
def test_vllm_captures_chat_data_like_the_reference(teachers, texts, ray_session, tmp_path):
    """A real vLLM engine (Qwen2 family, template from data.chat_template) captures chat data:
    the same tokens and mask as `orchestrator.chat` gives, labels that agree with the
    transformers reference."""
    from actors.hf_backend import HFBackend
    from orchestrator.driver.pipeline import capture
    from orchestrator.shards.format import read_shards

    rows = _chats(texts, n=8)
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = capture_config(tmp_path, teachers["qwen2"], data, **{
        "teacher.backend": "vllm", "teacher.kv_cache_gib": 0.25, "teacher.dtype": "float32",
        "data.chat_template": teachers["template"], "data.max_length": 256})
    capture(cfg)
    got = list(read_shards(cfg.output_dir))
    assert len(got) == 8
    by_id = {r["id"]: r for r in rows}
    ref = HFBackend(teachers["qwen2"])
    for r in got:
        ids, mask = _expected(teachers["qwen2"], by_id[r["sample_id"]])
        assert r["input_ids"].tolist() == ids  # whole: no conversation is longer than 256
        np.testing.assert_array_equal(r["loss_mask"], mask)
        want = ref.score([r["input_ids"].tolist()], k=8)[0]
        assert (r["topk_ids"][:, 0] == want.topk_ids[:, 0]).mean() > 0.95
