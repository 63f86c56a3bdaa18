"""A served student's chat template: a conversation rendered into prompt ids, and the tokens that
end an assistant turn. Tokenizer work only (no torch, no Ray); serve/openai_api.py uses it for
`POST /v1/chat/completions`.

    from serve.chat import end_of_turn_ids, has_chat_template, render
    ids = render(tokenizer, [{"role": "user", "content": "Hi"}])  # ends with the generation prompt
    stop = end_of_turn_ids(tokenizer)                              # e.g. {id of <|im_end|>, eos}

The end-of-turn rule. A chat model ends its answer with the token its template writes after an
assistant message (`<|im_end|>` in ChatML/Qwen, `<|eot_id|>` in Llama 3, `<end_of_turn>` in Gemma,
`</s>` in Llama 2 / Mistral), which is often not the tokenizer's or the model config's eos. It is
found by rendering a probe conversation whose assistant message is a marker string and reading the
first token after the marker: when that token is a special token (the tokenizer's special or
added-special tokens), possibly after whitespace, it ends a turn. The tokenizer's eos always ends
one too. A template that writes plain text after an assistant message (no special token) gives no
end-of-turn token beyond eos: its student then stops at eos, a stop string or max_tokens.
"""

from __future__ import annotations

_MARKER = "RAYDISTILLENDOFTURNPROBE"
_PROBES = (
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARKER}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": _MARKER}],
)
"""Conversations rendered to find the end-of-turn token; the second for templates that insist on
a system message."""


class TemplateRefused(ValueError):
    """The chat template raised on these messages (e.g. roles that must alternate)."""


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt ids of `messages` ({role, content: str}) as the template writes them, with the
    generation prompt (the opening of the assistant's turn) appended. The template writes any
    BOS itself, so the text is tokenized without adding special tokens (as apply_chat_template
    does). TemplateRefused with the template's own message if it rejects the conversation."""
    return list(tokenizer(_text(tokenizer, messages, generation_prompt=True),
                          add_special_tokens=False)["input_ids"])


def end_of_turn_ids(tokenizer) -> frozenset[int]:
    """The ids that end an assistant turn: the tokenizer's eos and the template's end-of-turn
    token (module docstring); empty without a chat template."""
    if not has_chat_template(tokenizer):
        return frozenset()
    ids = set() if tokenizer.eos_token_id is None else {int(tokenizer.eos_token_id)}
    special = _special_ids(tokenizer)
    for probe in _PROBES:
        try:
            text = _text(tokenizer, probe, generation_prompt=False)
        except TemplateRefused:
            continue
        if _MARKER not in text:
            continue
        after = text[text.index(_MARKER) + len(_MARKER):]
        for token in tokenizer(after, add_special_tokens=False)["input_ids"]:
            if token in special:
                ids.add(int(token))
                break
            if tokenizer.decode([token]).strip():
                break  # plain text follows the answer: no end-of-turn token
        break
    return frozenset(ids)


def _text(tokenizer, messages: list[dict], *, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja2's TemplateError, or what the template raises
        raise TemplateRefused(f"{type(e).__name__}: {e}") from None


def _special_ids(tokenizer) -> set[int]:
    ids = {int(i) for i in tokenizer.all_special_ids}
    ids |= {int(i) for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items()
            if getattr(token, "special", False)}
    return ids
