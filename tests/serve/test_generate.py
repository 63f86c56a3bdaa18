"""The batched decode loop (serve/generate.py) against transformers' own `generate`, no Ray."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from serve.generate import (Sampling, _safe_end, decode_batch, decode_text, encode_prompt,
                            generate_text, load_student)

PROMPTS = ["def f(", "import os\nclass Foo:\n    def __init__(self, name", "x",
           "for i in range(10):\n    print(i)\n    if i > 3:\n        break\n"]


@pytest.fixture(scope="module")
def student(students):
    return load_student(next(iter(students["paths"].values())), threads=1)


def _hf_greedy(student, prompt: str, n: int) -> str:
    ids = torch.tensor([encode_prompt(student, prompt)])
    with torch.no_grad():
        out = student.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=n)
    return decode_text(student, out[0, ids.shape[1]:].tolist())


def _run(student, prompts, params):
    """Texts, finish reasons and token counts of a batch, checking the per-step protocol."""
    texts, last, ended = [""] * len(prompts), [None] * len(prompts), set()
    for step in decode_batch(student, [encode_prompt(student, p) for p in prompts], params):
        assert len(step) == len(prompts)
        for i, d in enumerate(step):
            if i in ended:
                assert d is None  # a row that ended stays None
                continue
            texts[i] += d.text
            last[i] = d
            if d.finish_reason:
                ended.add(i)
    assert ended == set(range(len(prompts)))
    return texts, [d.finish_reason for d in last], [d.tokens for d in last]


def test_greedy_equals_generate_alone_and_batched(student):
    want = [_hf_greedy(student, p, 24) for p in PROMPTS]
    alone = [generate_text(student, p, Sampling(max_tokens=24, temperature=0))[0]
             for p in PROMPTS]
    batched, reasons, tokens = _run(student, PROMPTS, [Sampling(max_tokens=24, temperature=0)] * 4)
    assert alone == want
    assert batched == want
    assert all(r == "length" for r in reasons) and tokens == [24] * 4


def test_rows_keep_their_own_max_tokens_and_sampling(student):
    params = [Sampling(max_tokens=5, temperature=0), Sampling(max_tokens=17, temperature=0),
              Sampling(max_tokens=9, temperature=0.8, seed=7),
              Sampling(max_tokens=12, temperature=1.0, top_p=0.9, seed=3)]
    texts, reasons, tokens = _run(student, PROMPTS, params)
    assert tokens == [5, 17, 9, 12] and reasons == ["length"] * 4
    assert texts[0] == _hf_greedy(student, PROMPTS[0], 5)
    assert texts[1] == _hf_greedy(student, PROMPTS[1], 17)
    # a seeded row gives the same text alone as in any batch
    assert texts[2] == generate_text(student, PROMPTS[2], params[2])[0]
    assert texts[3] == generate_text(student, PROMPTS[3], params[3])[0]


def test_seeds_reproduce_and_differ(student):
    runs = [generate_text(student, "def f(", Sampling(max_tokens=20, temperature=1.0, seed=s))[0]
            for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]


def test_stop_string_is_cut_and_ends_the_row(student):
    full = _hf_greedy(student, PROMPTS[0], 24)
    stop = full[6:9]
    cut = full.find(stop)
    text, reason, _ = generate_text(student, PROMPTS[0],
                                    Sampling(max_tokens=24, temperature=0, stop=("@@@", stop)))
    assert (text, reason) == (full[:cut], "stop")


def test_eos_ends_the_row_without_its_text(student):
    ids = encode_prompt(student, PROMPTS[0])
    first = next(decode_batch(student, [ids], [Sampling(max_tokens=8, temperature=0)]))[0]
    assert first.tokens == 1
    greedy = [int(student.model(torch.tensor([ids])).logits[0, -1].argmax())]
    as_eos = dataclasses.replace(student, eos_ids=frozenset(greedy))
    text, reason, tokens = generate_text(as_eos, PROMPTS[0], Sampling(max_tokens=8, temperature=0))
    assert (text, reason, tokens) == ("", "stop", 1)


def test_text_held_back_for_partial_stop_strings_and_utf8():
    assert _safe_end("hello wor", ("world",)) == len("hello ")
    assert _safe_end("hello", ("xyz",)) == 5
    assert _safe_end("caf\ufffd", ()) == 3
    assert _safe_end("a\ufffdb", ()) == 3  # a replacement char inside the text is final


def test_load_refuses_weights_that_are_not_safetensors(tmp_path, students):
    src = next(iter(students["paths"].values()))
    (tmp_path / "config.json").write_text(open(f"{src}/config.json").read())
    with pytest.raises(ValueError, match="safetensors"):
        load_student(str(tmp_path))


def test_pickled_weights_are_refused_without_unpickling(tmp_path, students, monkeypatch):
    """A model directory with only pytorch_model.bin (a pickle) is refused, naming the fix, and
    nothing is unpickled on the way: torch.load and pickle.load fail the test if called."""
    import pickle
    import shutil

    from orchestrator.config import ServeConfig
    from orchestrator.errors import RaydistillError
    from orchestrator.winners import ServedModel
    from serve.app import build_app

    src = next(iter(students["paths"].values()))
    shutil.copytree(src, tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({"w": torch.zeros(2)}, tmp_path / "m" / "pytorch_model.bin")

    def unpickle(*args, **kwargs):
        raise AssertionError("something tried to unpickle a checkpoint")

    monkeypatch.setattr(torch, "load", unpickle)
    monkeypatch.setattr(pickle, "load", unpickle)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*never loads.*"
                                         r"safe_serialization=True"):
        load_student(str(tmp_path / "m"))
    with pytest.raises(RaydistillError, match=r"cannot serve m: .*pytorch_model\.bin"):
        build_app([ServedModel(id="m", path=str(tmp_path / "m"))], ServeConfig())


def test_every_torch_load_is_weights_only():
    """Static check over the repository's own sources: each torch.load call passes
    weights_only=True (no arbitrary unpickling anywhere)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    calls = []
    for path in root.rglob("*.py"):
        if any(part.startswith(".") or part in ("build", "dist") for part in
               path.relative_to(root).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            func = getattr(node, "func", None)
            if isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and \
                    func.attr == "load" and getattr(func.value, "id", None) == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and
                           k.value.value is True for k in node.keywords)
                calls.append((f"{path.relative_to(root)}:{node.lineno}", safe))
    assert calls, "expected at least the train loop's checkpoint load"
    assert [where for where, safe in calls if not safe] == []
