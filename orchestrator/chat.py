"""Records to token ids and the tokens that are learned (the loss mask), for the three record
formats of `orchestrator.data`; the teacher actor calls `encode` with the teacher's tokenizer.

- text: the tokenizer's ids of the text (special tokens added, e.g. BOS); every token is learned.
- completion: the prompt's ids (special tokens added), then the completion's, then EOS; only the
  completion and EOS are learned. Prompt and completion are tokenized apart, so the boundary is
  exact whatever the tokenizer merges.
- chat: the conversation rendered with the chat template (`resolve_template`: `data.chat_template`
  or the teacher's own) and tokenized as rendered (no special tokens added: templates write their
  own BOS, as `apply_chat_template(tokenize=True)` does). Learned: each assistant turn's content
  and its end-of-turn marker. The span of turn i is found by rendering prefixes: the
  conversation up to turn i with the generation prompt ends where the reply starts; up to and
  including turn i (trailing whitespace dropped: ChatML's newline after `<|im_end|>`) ends where
  it ends. A token is learned when it holds a character of that span (the fast tokenizer's
  offsets): a reply that starts with whitespace the tokenizer merges with the template's newline
  before it (`"\n" + "\n    x"`) learns that merged token, as transformers'
  `return_assistant_tokens_mask` does (a slow tokenizer, without offsets, is refused). Any
  template whose renderings of a conversation's prefixes are prefixes of its rendering works;
  one that breaks that (it rewrites earlier turns, like Qwen3's thinking template) is refused
  with `ChatTemplateError`, naming the record — before any work for the probe conversation
  `check_template` renders.

`train_on_prompt` learns every token instead. In sample mode only the prompt is encoded: a chat's
messages without a final assistant turn, rendered with the generation prompt; the teacher writes
the reply and stops at EOS or the template's end-of-turn token (`stop_ids`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import ConfigError, DataError


class ChatTemplateError(DataError):
    """The chat template cannot mark a record's assistant tokens (or does not render it)."""


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    spans: list[tuple[int, int]] | None
    """Learned tokens as [start, end) ranges of `ids`; None: every token."""


def resolve_template(tokenizer, path: str = "", *, teacher: str = "") -> str:
    """The chat template to render with: the file `path` (data.chat_template) if given, else the
    tokenizer's own. Raises ConfigError naming both ways when there is none."""
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"data.chat_template {path} cannot be read "
                              f"({getattr(e, 'strerror', None) or e}); point it at a Jinja "
                              "template file (UTF-8 text)") from None
        if not text.strip():
            raise ConfigError(f"data.chat_template {path} is empty; write the Jinja chat "
                              "template in it, or unset it to use the teacher's")
        return text
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if not own:
        raise ConfigError(f"the data holds chat records but the teacher {teacher} has no chat "
                          "template (no chat_template in its tokenizer_config.json or "
                          "chat_template.jinja); set data.chat_template to a Jinja template file")
    return own


def template_digest(template: str) -> str:
    """What a capture's fingerprint records of the template: the sha256 of its text."""
    return hashlib.sha256(template.encode()).hexdigest()[:16]


def encode(record, tokenizer, *, template: str | None, mode: str = "score",
           train_on_prompt: bool = False) -> Encoded:
    """`record`'s token ids and learned spans (score mode), or its prompt's ids (sample mode:
    spans None). `template`: the chat template (chat records only)."""
    fmt = record.format
    if fmt == "text":
        return Encoded(_ids(tokenizer, record.text, special=True), None)
    if fmt == "completion":
        prompt = _ids(tokenizer, record.text, special=True)
        if mode == "sample":
            return Encoded(prompt, None)
        reply = _ids(tokenizer, record.completion, special=False)
        if tokenizer.eos_token_id is not None:
            reply.append(tokenizer.eos_token_id)
        ids = prompt + reply
        return Encoded(ids, None if train_on_prompt else [(len(prompt), len(ids))])
    messages = [{"role": role, "content": content} for role, content in record.messages]
    if mode == "sample":
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return Encoded(_ids(tokenizer, _render(tokenizer, template, messages, True, record),
                            special=False), None)
    full = _render(tokenizer, template, messages, False, record)
    if train_on_prompt:
        return Encoded(_ids(tokenizer, full, special=False), None)
    chars = []  # [start, end) characters of each assistant turn in `full`
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = _prefix_chars(tokenizer, template, messages[:i], True, full, record)
            end = _prefix_chars(tokenizer, template, messages[:i + 1], False, full, record)
            if end > start:
                chars.append((start, end))
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError(
            f"record {record.sample_id}: marking the assistant tokens needs a fast tokenizer "
            "(tokenizer.json: its character offsets place each turn); the teacher's has none — "
            "save it as a fast tokenizer, or set data.train_on_prompt=true")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    return Encoded(list(enc["input_ids"]),
                   _runs([any(a < e and s < b for a, b in chars) for s, e in offsets]))


def check_template(tokenizer, template: str) -> None:
    """Render a probe conversation (two rounds) and mark its assistant tokens: a template that
    cannot be used is refused (`ChatTemplateError`) before any work."""
    from orchestrator.data import Record

    probe = Record("(a probe conversation)", "", messages=(
        ("user", "Hi"), ("assistant", "Hello"), ("user", "Bye"), ("assistant", "Bye")))
    encode(probe, tokenizer, template=template)


def stop_ids(tokenizer, template: str) -> list[int]:
    """The tokens that end a sampled reply: EOS, and the template's end-of-turn token — the last
    token of an assistant turn's learned span when it is a special (added) token, such as
    `<|im_end|>` or `<|eot_id|>`. A template that ends turns with plain text adds none."""
    from orchestrator.data import Record

    out = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    probe = Record("probe", "", messages=(("user", "Hi"), ("assistant", "Hello")))
    enc = encode(probe, tokenizer, template=template)
    if enc.spans:
        last = enc.ids[enc.spans[0][1] - 1]
        if last in set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder):
            out.append(last)
    return sorted(set(out))


def _ids(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _render(tokenizer, template: str | None, messages: list[dict], generation: bool,
            record) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation)
    except Exception as e:  # noqa: BLE001 — Jinja's errors (TemplateError, raise_exception, …)
        raise ChatTemplateError(f"record {record.sample_id}: the chat template does not render "
                                f"it ({type(e).__name__}: {str(e)[:200]}); fix the record or "
                                "the template (data.chat_template)") from None


def _prefix_chars(tokenizer, template, messages, generation, full: str, record) -> int:
    """Characters of `full` up to the end of the rendering of `messages` (trailing whitespace
    dropped unless `generation`); checks that the rendering is a prefix of `full`."""
    part = _render(tokenizer, template, messages, generation, record) if messages or \
        generation else ""
    if not generation:
        part = part.rstrip()
    if not full.startswith(part):
        raise ChatTemplateError(
            f"record {record.sample_id}: the chat template renders the conversation's first "
            f"{len(messages)} message(s) as text that does not begin the whole conversation's "
            "(it rewrites earlier turns), so the assistant tokens cannot be marked; use a "
            "template without that (data.chat_template), or set data.train_on_prompt=true")
    return len(part)


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """[start, end) runs of True in `flags`."""
    out, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            out.append((start, i))
            start = None
    return out
