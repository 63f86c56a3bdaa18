"""How a capture reads its records and turns them into tokens, as far as the driver must know
before any work: `orchestrator.data.iter_records`' arguments of a config, and the chat template
plus what a capture's fingerprint records of the rendering (`orchestrator.chat` does the
rendering itself, in the teacher actors)."""

from __future__ import annotations

from orchestrator.config import Config


def record_args(cfg: Config) -> dict:
    """`orchestrator.data.iter_records`' arguments that say how to read this config's records."""
    d, mode = cfg.data, cfg.teacher.mode
    return {"field": d.text_field if mode == "score" else d.prompt_field,
            "fallback_field": d.text_field, "format": d.format, "prompt_field": d.prompt_field,
            "mode": mode, "train_on_prompt": d.train_on_prompt}


def rendering_of(cfg: Config, formats: frozenset[str]) -> tuple[str, dict]:
    """The chat template (its text; "" without chat records) and what the fingerprint records of
    how records become tokens: nothing for text records (their tokens are the tokenizer's);
    the formats and train_on_prompt otherwise, and the template's digest for chat records. A
    chat template is resolved (data.chat_template, else the teacher's) and tried on a probe
    conversation before any work; none is a ConfigError, an unusable one a ChatTemplateError."""
    from orchestrator import chat
    from orchestrator.teacher_info import load_tokenizer

    d, t = cfg.data, cfg.teacher
    template = ""
    if "chat" in formats or d.chat_template:
        tokenizer = load_tokenizer(t.model, revision=t.revision)
        template = chat.resolve_template(tokenizer, d.chat_template, teacher=t.model)
        chat.check_template(tokenizer, template)
    if formats <= {"text"}:
        return "", {}
    rendering = {"formats": sorted(formats), "train_on_prompt": d.train_on_prompt}
    if "chat" in formats:
        return template, rendering | {"chat_template_sha256": chat.template_digest(template)}
    return "", rendering
