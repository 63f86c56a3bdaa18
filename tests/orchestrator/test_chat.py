"""Record formats and the loss mask without Ray: format detection per file, chat rendering with a
template from a file or from the tokenizer, the assistant tokens marked exactly (checked against
transformers' own `{% generation %}` mask), templates that cannot mark them refused, the mask
split with long texts, stored in shards, and used by collate and the held-out evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator import chat, data
from orchestrator.data import Record
from orchestrator.errors import ConfigError, DataError
from tests.conftest import write_jsonl

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""A ChatML-like template (Qwen's turn markers, no system default)."""
CHATML_GENERATION = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>"
    "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""The same rendering, its assistant tokens tagged for `return_assistant_tokens_mask`."""
TURNS = (("system", "Answer in Python."), ("user", "Sum of a list?"),
         ("assistant", "def total(xs):\n    return sum(xs)"), ("user", "And the max?"),
         ("assistant", "max(xs)"))
KW = dict(field="text", fallback_field="text", id_field="id", limit=None, on_bad_line="stop")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A small byte-level BPE tokenizer with ChatML's turn markers as special tokens."""
    from orchestrator.driver import tiny

    out = tmp_path_factory.mktemp("chat-tok")
    t = tiny.train_tokenizer(tiny.chunks_of_text(tiny.stdlib_sources()[:8]), out, vocab_size=400)
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return t


def test_auto_decides_per_file_and_refuses_a_mixed_file(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x = 1"}, {"text": "y = 2"}])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "Q", "completion": "A"}])
    write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "yo"}]}])
    result = data.scan(str(tmp_path), format="auto", train_on_prompt=False, **KW)
    assert result.records == 4 and result.formats == {"text", "completion", "chat"}
    recs = list(data.iter_records(result.files, format="auto", **KW))
    assert [r.format for r in recs] == ["text", "text", "completion", "chat"]
    assert (recs[2].text, recs[2].completion) == ("Q", "A")
    assert recs[3].messages == (("user", "hi"), ("assistant", "yo"))
    mixed = write_jsonl(tmp_path / "m.jsonl", [{"text": "x"}, {"text": "y"},
                                               {"prompt": "Q", "completion": "A"}])
    for skip in ("stop", "skip"):  # a mixed file is no bad line: skipping would hide a format
        with pytest.raises(DataError, match=r"m.jsonl:3: a completion record in a file of text "
                           r"records \(data.format=auto decided from line 1\).*move these "
                           "records to a file of their own, or set data.format"):
            data.scan(mixed, format="auto", **(KW | {"on_bad_line": skip}))
    # an explicit format reads the others as bad lines of that format
    result = data.scan(mixed, format="text", **(KW | {"on_bad_line": "skip"}))
    assert result.records == 2 and "missing string field 'text'" in result.skipped[0]


@pytest.mark.parametrize("record, phrase", [
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
    ({"messages": [{"content": "hi"}]}, "message 1 must be an object with a string 'role'"),
    ({"messages": [{"role": "user", "content": 3}]}, "message 1 (user) needs a string 'content'"),
    ({"messages": [{"role": "user", "content": "hi"}]},
     "a chat record without an 'assistant' message has nothing to learn"),
    ({"prompt": "Q", "completion": 5}, "field 'completion' must be a string, got int"),
    ({"prompt": "", "completion": "A"}, "empty 'prompt'"),
])
def test_bad_chat_and_completion_records_name_the_line(tmp_path, record, phrase):
    p = write_jsonl(tmp_path / "d.jsonl", [record])
    fmt = "chat" if "messages" in record else "completion"
    with pytest.raises(DataError) as e:
        data.scan(p, format=fmt, train_on_prompt=False, **KW)
    assert "d.jsonl:1: " + phrase in str(e.value)


def test_template_from_a_file_or_from_the_tokenizer_renders_alike(tok, tmp_path):
    path = tmp_path / "chatml.jinja"
    path.write_text(CHATML)
    with pytest.raises(ConfigError, match="teacher T has no chat template .* set "
                       "data.chat_template to a Jinja template file"):
        chat.resolve_template(tok, "", teacher="T")
    from_file = chat.resolve_template(tok, str(path))
    with_own = type(tok).from_pretrained(_saved(tok, tmp_path / "own", CHATML))
    assert chat.resolve_template(with_own, "") == from_file == CHATML
    record = Record("r", "", messages=TURNS)
    a = chat.encode(record, tok, template=from_file)
    b = chat.encode(record, with_own, template=chat.resolve_template(with_own, ""))
    assert a == b
    assert a.ids == with_own.apply_chat_template([{"role": r, "content": c} for r, c in TURNS],
                                                 tokenize=True, return_dict=False)
    with pytest.raises(ConfigError, match="data.chat_template .*missing.jinja cannot be read"):
        chat.resolve_template(tok, str(tmp_path / "missing.jinja"))


def _saved(tok, out, template: str) -> str:
    tok.chat_template = template
    tok.save_pretrained(str(out))
    tok.chat_template = None
    return str(out)


def _against_generation_tags(tok, turns) -> chat.Encoded:
    """`chat.encode` of `turns`, checked against transformers' mask of the tagged template."""
    enc = chat.encode(Record("r", "", messages=turns), tok, template=CHATML)
    messages = [{"role": r, "content": c} for r, c in turns]
    ref = tok.apply_chat_template(messages, chat_template=CHATML_GENERATION, tokenize=True,
                                  return_dict=True, return_assistant_tokens_mask=True)
    assert ref["input_ids"] == enc.ids
    mask = np.zeros(len(enc.ids), dtype=bool)
    for a, b in enc.spans:
        mask[a:b] = True
    np.testing.assert_array_equal(mask, np.asarray(ref["assistant_masks"], dtype=bool))
    return enc


def test_masked_tokens_are_exactly_the_assistant_content_and_end_of_turn(tok):
    record = Record("r", "", messages=TURNS)
    enc = _against_generation_tags(tok, TURNS)
    assert [tok.decode(enc.ids[a:b]) for a, b in enc.spans] == [
        "def total(xs):\n    return sum(xs)<|im_end|>", "max(xs)<|im_end|>"]
    assert chat.encode(record, tok, template=CHATML, train_on_prompt=True).spans is None
    assert chat.stop_ids(tok, CHATML) == sorted({tok.eos_token_id,
                                                 tok.convert_tokens_to_ids("<|im_end|>")})


def test_a_reply_merged_with_the_template_s_newline_learns_the_merged_token(tok):
    """A reply that starts with whitespace: the tokenizer merges it with the generation prompt's
    newline, so no token boundary lies where the reply starts. The merged token holds reply
    characters and is learned (what transformers' generation mask does too)."""
    turns = (("user", "Indent it"), ("assistant", "\n    return x\n\n"), ("user", "Again"),
             ("assistant", "  pass"))
    enc = _against_generation_tags(tok, turns)
    first = tok.decode(enc.ids[enc.spans[0][0]])
    assert first.startswith("\n") and first.strip() == "" and len(first) > 1
    assert tok.decode(enc.ids[:enc.spans[0][0]]).endswith("<|im_start|>assistant")


def test_completion_records_learn_the_completion_and_eos(tok):
    enc = chat.encode(Record("c", "Q: sum?\nA:", completion=" sum(xs)"), tok, template=None)
    prompt = tok("Q: sum?\nA:")["input_ids"]
    assert enc.ids[:len(prompt)] == prompt and enc.ids[-1] == tok.eos_token_id
    assert enc.spans == [(len(prompt), len(enc.ids))]
    assert tok.decode(enc.ids[len(prompt):-1]) == " sum(xs)"
    sample = chat.encode(Record("c", "Q: sum?\nA:", completion=" x"), tok, template=None,
                         mode="sample")
    assert sample == chat.Encoded(prompt, None)


def test_chat_prompt_in_sample_mode_ends_with_the_generation_prompt(tok):
    enc = chat.encode(Record("r", "", messages=TURNS), tok, template=CHATML, mode="sample")
    text = tok.decode(enc.ids)
    assert text.endswith("<|im_start|>user\nAnd the max?<|im_end|>\n<|im_start|>assistant\n")
    assert "max(xs)" not in text and enc.spans is None  # the final reply is the teacher's to write


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    """Qwen3-style: only the last assistant turn keeps its content; earlier ones are rewritten,
    so the rendering of a prefix is no prefix of the whole and no span can be marked."""
    rewriting = CHATML.replace("{{ m['content'] }}",
                               "{% if m['role'] == 'assistant' and not loop.last %}[earlier]"
                               "{% else %}{{ m['content'] }}{% endif %}")
    with pytest.raises(chat.ChatTemplateError, match="record r: the chat template renders the "
                       "conversation's first 3 message.*rewrites earlier turns.*train_on_prompt"):
        chat.encode(Record("r", "", messages=TURNS), tok, template=rewriting)
    broken = "{{ messages[0]['nope'].x() }}"
    with pytest.raises(chat.ChatTemplateError, match="record r: the chat template does not render"):
        chat.encode(Record("r", "", messages=TURNS), tok, template=broken)


def test_the_mask_is_split_with_a_long_text():
    from actors.teacher import split_tokens
    from orchestrator.shards.format import mask_to_spans, spans_to_mask

    mask = spans_to_mask([(3, 5), (8, 10)], 10)
    assert mask.tolist() == [False] * 3 + [True] * 2 + [False] * 3 + [True] * 2
    np.testing.assert_array_equal(mask_to_spans(mask), [3, 5, 8, 10])
    assert mask_to_spans(None) is None and spans_to_mask(None, 3).all()
    pieces = split_tokens(list(range(10)), 4, "split", mask=mask)
    # the middle piece [4..7] learns nothing after its first token: dropped
    assert [p for p, _ in pieces] == [[0, 1, 2, 3], [8, 9]]
    assert [m.tolist() for _, m in pieces] == [[False, False, False, True], [True, True]]
    assert [p for p, _ in split_tokens(list(range(10)), 4, "truncate", mask=mask)] == \
        [[0, 1, 2, 3]]
    assert split_tokens(list(range(10)), 3, "truncate", mask=mask) == []  # only prompt: dropped


def _sample(ids, mask, k=2):
    T = len(ids)
    return {"input_ids": np.asarray(ids, dtype=np.int32), "prompt_len": 0, "label_start": 0,
            "topk_ids": np.tile(np.arange(k, dtype=np.int32), (T, 1)),
            "topk_logprobs": np.full((T, k), -1.0, dtype=np.float32),
            "target_logprobs": np.full(T, -0.5, dtype=np.float32),
            "tail_mass": np.full((T, 1), 0.1, dtype=np.float32),
            "tail_temperatures": np.asarray([1.0], dtype=np.float32),
            "loss_mask": np.asarray(mask, dtype=bool)}


def test_collate_learns_only_the_masked_next_tokens_and_evaluation_counts_them():
    import torch

    from orchestrator.kd.batches import collate
    from orchestrator.kd.evaluate import evaluate

    masked = _sample([5, 6, 7, 8, 9, 4], [0, 0, 0, 1, 1, 1])
    plain = _sample([5, 6, 7], [1, 1, 1])
    batch = collate([masked, plain])
    # position t predicts token t + 1: only positions 2, 3, 4 of the masked sample learn
    assert batch.targets[0].tolist() == [-100, -100, 8, 9, 4, -100]
    assert batch.kd_mask[0].tolist() == [False, False, True, True, True, False]
    # a sample with every token learned: today's rule (the last position's KD label kept)
    assert batch.targets[1].tolist() == [6, 7, -100, -100, -100, -100]
    assert batch.kd_mask[1].tolist() == [True, True, True, False, False, False]

    class Uniform(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 10)})()

        def get_output_embeddings(self):  # 10 rows: what evaluation folds the teacher's ids to
            return torch.nn.Linear(1, 10, bias=False)

    sums = evaluate(Uniform(), [masked, plain])
    assert sums["positions"] == 3 + 2 and sums["teacher_positions"] == 5
    assert sums["teacher_nll"] == pytest.approx(5 * 0.5)


def test_shards_store_the_mask_and_refuse_format_3(tmp_path):
    import io

    import pyarrow.parquet as pq

    from orchestrator.errors import ShardError
    from orchestrator.kd.softlabels import SoftLabels
    from orchestrator.shards import format as fmt
    from orchestrator.storage import filesystem

    def labels(T, mask):
        return SoftLabels(np.arange(T, dtype=np.int32), 0, 0, np.zeros((T, 2), np.int32),
                          np.full((T, 2), -1.0, np.float32), np.full(T, -1.0, np.float32),
                          np.full((T, 1), 0.2, np.float32), loss_mask=mask)

    fs, root = filesystem(str(tmp_path))
    fs.create_dir(f"{root}/shards", recursive=True)
    mask = np.asarray([0, 0, 1, 1, 0, 1], dtype=bool)
    fmt.write_shard(fs, f"{root}/shards", 0, [("a", labels(6, mask)), ("b", labels(3, None))],
                    {"k": 2})
    path = tmp_path / "shards" / fmt.shard_name(0)
    table = fmt.load_shard(path.read_bytes(), name=str(path))
    assert table.column("loss_mask").to_pylist() == [[2, 4, 5, 6], None]
    rows = list(fmt.decode_rows(table))
    assert rows[0]["loss_mask"].tolist() == mask.tolist() and rows[1]["loss_mask"].all()
    # a unit whose records all had nothing to learn (truncated to their prompt) is an empty shard
    info = fmt.write_shard(fs, f"{root}/shards", 1, [], {"k": 2})
    assert info.rows == 0 and list(fmt.decode_rows(fmt.load_shard(
        (tmp_path / "shards" / info.file).read_bytes(), name=info.file))) == []
    # a shard of format 3: no loss_mask column, format_version 3 — refused, saying what to do
    meta = fmt.shard_metadata(table) | {"format_version": 3}
    old = table.drop_columns(["loss_mask"]).replace_schema_metadata(
        {fmt.META_KEY: json.dumps(meta).encode()})
    buf = io.BytesIO()
    pq.write_table(old, buf)
    with pytest.raises(ShardError, match="has shard format 3 .*this raydistill reads format 4. "
                       "Recapture with `raydistill capture CONFIG --fresh`"):
        fmt.load_shard(buf.getvalue(), name="old.parquet")
