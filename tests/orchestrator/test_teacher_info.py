"""The tokenizer every part of raydistill uses encodes text exactly as the model's own
tokenizer.json does, for every family (transformers 5 rebuilds some families' tokenizers from
their vocabulary by model_type, silently changing the ids)."""

import pytest

from orchestrator.driver import tiny

TEXT = "def f(x):\n\n    return x  # héllo\n\tclass A:  pass\n"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    tiny.train_tokenizer(list(tiny.chunks_of_text(tiny.stdlib_sources()[:8])), out,
                         vocab_size=400)
    return out


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_load_tokenizer_encodes_as_the_saved_tokenizer_json(tokenizer_dir, tmp_path, family):
    import shutil

    from tokenizers import Tokenizer

    from orchestrator.teacher_info import load_tokenizer, tokenizer_fingerprint

    model_dir = tmp_path / family
    shutil.copytree(tokenizer_dir, model_dir)
    tiny.family_config(family, 400, layers=1).save_pretrained(model_dir)
    tok = load_tokenizer(str(model_dir))
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert tok(TEXT, add_special_tokens=False)["input_ids"] == \
        raw.encode(TEXT, add_special_tokens=False).ids
    # a student saves this tokenizer; loading the student's directory gives the same one back
    saved = tmp_path / "student"
    tok.save_pretrained(saved)
    tiny.family_config(family, 400, layers=1).save_pretrained(saved)
    again = load_tokenizer(str(saved), what="student")
    assert again(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tok)
