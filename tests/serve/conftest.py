"""Serving fixtures beside tests/conftest.py's `students`: a tiny chat student (ChatML-like template
written here) that the serving tests host next to the two students without a chat template."""

from __future__ import annotations

import pytest

CHAT = "c0003-chat"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""A ChatML-like template (Qwen's shape): a turn ends with <|im_end|>, which is not the eos."""
CONVERSATION = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "def f("}]


@pytest.fixture(scope="session")
def chat_student(students, tmp_path_factory):
    """{"id", "path", "end_of_turn"}: a 1 × 128 Llama over the students' tokenizer plus
    <|im_start|> / <|im_end|> (special tokens), with CHATML as its chat template.

    Hack, so that end-of-turn stopping is observable on an untrained model: <|im_end|>'s row of
    the LM head is a 1.05× copy of the row of a token the model says greedily answering
    CONVERSATION, so the model says <|im_end|> where it would have said that token (its logit is
    positive there). The copied token is the first, from the third generated on, for which the
    answer then ends at <|im_end|> after at least two tokens of text."""
    import torch

    from orchestrator.driver import tiny
    from orchestrator.teacher_info import load_tokenizer
    from serve.chat import render

    out = tmp_path_factory.mktemp("chat-student")
    tok = load_tokenizer(next(iter(students["paths"].values())), what="student")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    end = tok.convert_tokens_to_ids("<|im_end|>")
    model = tiny.build_model(tiny.llama_config(len(tok), layers=1, hidden=128, heads=2,
                                               max_positions=256), seed=2)
    ids = torch.tensor([render(tok, CONVERSATION)])
    head = model.get_output_embeddings().weight

    def answer(stop: list[int]) -> list[int]:
        with torch.no_grad():
            out_ids = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=12, eos_token_id=stop, pad_token_id=stop[0])
        return out_ids[0, ids.shape[1]:].tolist()

    plain = answer([tok.eos_token_id])
    for step in range(2, len(plain)):
        with torch.no_grad():
            head[end] = 1.05 * head[plain[step]]
        said = answer([tok.eos_token_id, end])
        if len(said) >= 3 and said[-1] == end:
            break
    else:
        raise AssertionError(f"no token of {plain} makes the answer end at <|im_end|>")
    tok.save_pretrained(str(out))
    model.save_pretrained(str(out), safe_serialization=True)
    return {"id": CHAT, "path": str(out), "end_of_turn": end}
