"""A student's chat template (serve/chat.py): rendering, the end-of-turn rule on the template
shapes of real families, and decoding that stops at the end of a turn. No Ray."""

from __future__ import annotations

import pytest
import torch

from serve.chat import TemplateRefused, end_of_turn_ids, has_chat_template, render
from serve.generate import Sampling, decode_batch, decode_text, load_student
from tests.serve.conftest import CONVERSATION

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
          "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
          "{% endif %}")
LLAMA2 = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] "
          "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}"
          "{% endfor %}")
ALPACA = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
          "{% if add_generation_prompt %}### assistant:\n{% endif %}")
NEEDS_SYSTEM = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message "
                "comes first') }}{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                "{{ m['content'] }}<|im_end|>\n{% endfor %}")


@pytest.fixture(scope="module")
def chat_tok(chat_student):
    from orchestrator.teacher_info import load_tokenizer

    return load_tokenizer(chat_student["path"], what="student")


@pytest.fixture(scope="module")
def plain_tok(students):
    from orchestrator.teacher_info import load_tokenizer

    return load_tokenizer(next(iter(students["paths"].values())), what="student")


def test_render_is_the_template_with_its_generation_prompt(chat_tok):
    ids = render(chat_tok, [{"role": "user", "content": "hi"}])
    start, end = chat_tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0] == start and ids.count(end) == 1 and ids.count(start) == 2
    assert chat_tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_end_of_turn_is_the_special_token_after_an_assistant_message(chat_student, chat_tok):
    """ChatML: <|im_end|>, not the eos, so the rule must read the template."""
    assert end_of_turn_ids(chat_tok) == {chat_tok.eos_token_id, chat_student["end_of_turn"]}
    assert chat_student["end_of_turn"] != chat_tok.eos_token_id


def test_end_of_turn_on_other_families_templates(chat_student):
    """Llama 3 (<|eot_id|>), Llama 2 (eos after a space), a plain-text template (eos only), one
    that refuses a conversation without a system message (read from the second probe)."""
    from orchestrator.teacher_info import load_tokenizer

    tok = load_tokenizer(chat_student["path"], what="student")  # its own: tokens are added
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>",
                                                         "<|end_header_id|>", "<|eot_id|>"]})
    im_end, eot = tok.convert_tokens_to_ids(["<|im_end|>", "<|eot_id|>"])
    for template, want in [(LLAMA3, {eot}), (LLAMA2, set()), (ALPACA, set()),
                           (NEEDS_SYSTEM, {im_end})]:
        tok.chat_template = template
        assert end_of_turn_ids(tok) == {tok.eos_token_id} | want, template[:30]
    with pytest.raises(TemplateRefused, match="a system message comes first"):
        render(tok, [{"role": "user", "content": "hi"}])


def test_no_template_no_end_of_turn(plain_tok):
    assert not has_chat_template(plain_tok) and end_of_turn_ids(plain_tok) == frozenset()


def test_decoding_stops_at_the_end_of_turn(chat_student):
    """The served loop with the template's stop ids equals transformers' generate told to stop at
    eos and <|im_end|>; without them it runs on to max_tokens."""
    student = load_student(chat_student["path"], threads=1)
    assert student.end_of_turn_ids == {student.tokenizer.eos_token_id, chat_student["end_of_turn"]}
    ids = render(student.tokenizer, CONVERSATION)
    x = torch.tensor([ids])
    with torch.no_grad():
        out = student.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                     max_new_tokens=12, eos_token_id=sorted(
                                         student.end_of_turn_ids), pad_token_id=0)
    said = out[0, len(ids):].tolist()
    assert said[-1] == chat_student["end_of_turn"] and len(said) < 12

    def run(stop_ids):
        deltas = [step[0] for step in decode_batch(student, [ids], [Sampling(
            max_tokens=12, temperature=0, stop_ids=stop_ids)])]
        return "".join(d.text for d in deltas), deltas[-1].finish_reason, deltas[-1].tokens

    assert run(student.end_of_turn_ids) == (decode_text(student, said[:-1]), "stop", len(said))
    text, reason, tokens = run(frozenset())
    assert (reason, tokens) == ("length", 12)
