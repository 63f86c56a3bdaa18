"""Fixtures for the serving tests: two tiny students (same tokenizer, different seeds) saved as
Hugging Face directories, and a sweep directory whose winners.json lists them."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def students(tmp_path_factory):
    """{"sweep": sweep dir with winners.json, "paths": {id: model dir}} — 1 × 128 Llamas,
    1024-token BPE, context 256."""
    from orchestrator import tiny
    from orchestrator.winners import write_winners

    sweep = tmp_path_factory.mktemp("sweep")
    tok_dir = sweep / "tokenizer"
    texts = list(tiny.chunks_of_text(tiny.stdlib_sources()[:20]))
    tok = tiny.train_tokenizer(texts, tok_dir, vocab_size=1024)
    paths = {}
    for rank, (name, seed) in enumerate([("t0001-1x128", 0), ("t0002-1x128", 1)], start=1):
        out = sweep / "trials" / name / "model"
        shutil.copytree(tok_dir, out)
        cfg = tiny.llama_config(len(tok), layers=1, hidden=128, heads=2, max_positions=256)
        tiny.build_model(cfg, seed=seed).save_pretrained(str(out), safe_serialization=True)
        paths[name] = str(out)
    write_winners(str(sweep), [{"id": name, "path": f"trials/{name}/model", "rank": rank,
                                "metrics": {"eval_kl": 0.5 + rank}}
                               for rank, name in enumerate(paths, start=1)],
                  metric="eval_kl", mode="min")
    return {"sweep": str(sweep), "paths": paths}

