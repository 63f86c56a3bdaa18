"""Distillation teaches more than hard labels: a learning test through the real pipeline.

The texts are *sampled from* a tiny random teacher, so the teacher is the true distribution of the
data: its soft labels carry strictly more information per position than the one token sampled
there. The capture (hf backend, score mode) and both students (Ray Train, local mode) run through
`pipeline.capture` / `pipeline.train`; the KD student (alpha 0.5) and the hard-label baseline share
the seed, steps and data. At equal steps the KD student's held-out NLL must beat the hard-label
student's by a margin — which fails if the KD term is broken (labels ignored, or no gradient
through it: then alpha 0.5 under AdamW trains exactly like the hard-label student).

A one-character-one-token tokenizer makes decode → encode exact, so the captured token sequences
are the sampled ones. Two families: Llama, and Qwen2 (whose config carries per-layer
`layer_types`); teacher and student are one layer deep, so the student keeps the teacher's layer
list.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import train_config, write_jsonl

CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ01234567"
TEXT_TOKENS = 48
TRAIN_TEXTS, HELDOUT_TEXTS = 64, 24
STEPS = 40
MARGIN_NATS = 0.1


def _teacher_config(family: str, vocab: int):
    """A 1-layer, 64-wide config (head_dim 64) of `family`."""
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=128,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    from transformers import Qwen2Config

    return Qwen2Config(**common)


def _char_tokenizer(out_dir):
    """A byte-level BPE without merges over 60 ASCII letters and digits: one character, one token,
    so decoding then encoding gives the same ids — also through the family-specific tokenizer
    class that AutoTokenizer rebuilds for a Qwen2 directory (a word-level model would not
    survive that rebuild)."""

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from orchestrator.driver.tiny import SPECIAL_TOKENS

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: len(SPECIAL_TOKENS) + i for i, c in enumerate(CHARS)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(out_dir))
    return fast


def _teacher_and_texts(tmp_path, family: str):
    """A sharpened random teacher saved under tmp_path/teacher, and texts sampled from it."""
    import torch
    from transformers import AutoModelForCausalLM

    from orchestrator.teacher_info import load_tokenizer
    from orchestrator.driver.tiny import SPECIAL_TOKENS, sharpen

    out = tmp_path / "teacher"
    tok = _char_tokenizer(out)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_teacher_config(family, len(tok)))
    sharpen(model, scale=12.0)  # teacher NLL ≈ 2.7 nats/token on its own samples
    with torch.no_grad():  # special tokens get logit 0, far below a sharpened word's: < 1e-3
        model.lm_head.weight[:len(SPECIAL_TOKENS)] = 0  # of the mass; samples leave them out
    model.save_pretrained(str(out), safe_serialization=True)
    gen = torch.Generator().manual_seed(1)
    n = TRAIN_TEXTS + HELDOUT_TEXTS
    first = torch.randint(len(SPECIAL_TOKENS), len(tok), (n, 1), generator=gen)
    torch.manual_seed(1)
    ids = model.generate(first, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         max_new_tokens=TEXT_TOKENS - 1, min_new_tokens=TEXT_TOKENS - 1,
                         attention_mask=torch.ones_like(first), pad_token_id=3,
                         suppress_tokens=list(range(len(SPECIAL_TOKENS))))
    texts = [tok.decode(row) for row in ids.tolist()]
    product = load_tokenizer(str(out))  # what the capture will use
    assert [product(t, add_special_tokens=True)["input_ids"] for t in texts] == ids.tolist()
    return str(out), texts


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_kd_student_beats_the_hard_label_student_on_teacher_sampled_text(family, tmp_path,
                                                                       ray_session):
    from orchestrator.driver import pipeline

    teacher, texts = _teacher_and_texts(tmp_path, family)
    train = write_jsonl(tmp_path / "train.jsonl", [{"id": f"t{i}", "text": t}
                                                   for i, t in enumerate(texts[:TRAIN_TEXTS])])
    held = write_jsonl(tmp_path / "held.jsonl", [{"id": f"h{i}", "text": t}
                                                 for i, t in enumerate(texts[TRAIN_TEXTS:])])
    cfg = train_config(tmp_path / "out", teacher, train, **{
        "data.eval_path": held, "data.eval_fraction": 0, "data.max_length": 64,
        "teacher.k": 16, "capture.samples_per_shard": 16, "train.baselines": "[hard]",
        "train.eval_samples": HELDOUT_TEXTS, "train.num_workers": 0, "train.alpha": 0.5,
        "train.temperature": 1.0, "train.loss": "fkl", "train.lr": 3e-3,
        "train.batch_size": 8, "train.max_steps": STEPS, "train.eval_every": STEPS,
        "train.log_every": 20, "train.warmup_steps": 5, "student.preset": "nano"})
    pipeline.capture(cfg)
    path = pipeline.train(cfg)
    report = json.loads((Path(path).parent / "report.json").read_text())
    kd, hard = report["students"]["kd"], report["students"]["hard"]
    assert kd["steps"] == hard["steps"] == STEPS
    print(f"{family}: teacher {kd['teacher_nll']:.3f}, kd {kd['student_nll']:.3f} "
          f"(KL {kd['kl']:.3f}), hard {hard['student_nll']:.3f} (KL {hard['kl']:.3f})")
    assert kd["student_nll"] < hard["student_nll"] - MARGIN_NATS
    assert kd["kl"] < hard["kl"]
