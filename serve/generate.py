"""Batched autoregressive decoding for served students: pure torch + transformers, no Ray.

    from serve.generate import Sampling, decode_batch, encode_prompt, load_student
    student = load_student("path/to/model")
    for deltas in decode_batch(student, [encode_prompt(student, "def f(")],
                               [Sampling(max_tokens=16, temperature=0)]):
        print(deltas[0].text, end="")

Design. One batch = prompts for one model, decoded together step by step:
- A row ends at the model's eos or at one of its request's `stop_ids` (a chat template's
  end-of-turn token, serve/chat.py), neither of which is part of the text.
- Prompts are left-padded into `ids: [batch, longest]` with `attention_mask` (0 on padding) and
  `position_ids = cumsum(mask) - 1`, so each row sees exactly the positions it would see alone;
  greedy output therefore equals `model.generate(do_sample=False)` of that prompt alone (up to
  fp32 rounding, which the tests check on real prompts of different lengths).
- The prefill fills a `DynamicCache`; every later step feeds one token per row with the cache.
  A row that finishes (EOS, a stop string, or its own `max_tokens`) is dropped from the batch
  (`cache.batch_select_indices`), so short requests stop costing compute.
- Sampling is per row: temperature 0 is argmax; otherwise softmax(logits / T), nucleus `top_p`,
  and a `torch.Generator` of the row's own (seeded when `seed` is given, so a seeded request gives
  the same text whatever else shares its batch).
- Text is produced by decoding the row's whole generated ids each step and emitting the new
  suffix (byte-level BPE pieces are not valid text one token at a time). The tail is held back
  while it is an incomplete UTF-8 sequence (decodes to U+FFFD) or could be the start of a stop
  string; a matched stop string and everything after it is cut, as OpenAI does.
`decode_batch` is a generator: one list per step with a `Delta` for each row still running and
`None` for rows that ended at an earlier step, which is what Ray Serve's streaming `@serve.batch`
consumes (serve/openai_api.py turns `None` into its StopIteration marker).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class Sampling:
    """How one request is decoded."""

    max_tokens: int
    temperature: float = 1.0
    """0 = greedy (argmax)."""
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()
    """Tokens that end the row besides the model's eos (a chat template's end of turn); like
    eos they are not part of the text and count as a completion token."""


@dataclass(frozen=True)
class Delta:
    """What one decoding step produced for one request."""

    text: str
    """New text since the previous delta (may be empty while text is held back)."""
    tokens: int
    """Completion tokens generated so far (including an EOS that ended it)."""
    finish_reason: str | None = None
    """"stop" (EOS, a stop id or stop string) or "length" (max_tokens) on the row's last delta."""


@dataclass
class Student:
    """A loaded model with what decoding needs to know about it."""

    model: torch.nn.Module
    tokenizer: object
    context: int
    """Longest sequence (prompt + completion) the model takes: max_position_embeddings."""
    eos_ids: frozenset[int]
    pad_id: int
    end_of_turn_ids: frozenset[int] = frozenset()
    """Tokens that end an assistant turn of its chat template (serve/chat.py); empty without one."""


def load_student(path: str, *, threads: int | None = None) -> Student:
    """Load a Hugging Face causal-LM directory (safetensors weights only, never pickles), fp32."""
    from transformers import AutoModelForCausalLM

    from orchestrator.teacher_info import load_tokenizer
    from serve.chat import end_of_turn_ids

    if threads:
        torch.set_num_threads(threads)
    check_weights(path)
    tokenizer = load_tokenizer(path, what="student")
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=torch.float32)
    model.eval()
    return Student(model=model, tokenizer=tokenizer, context=_context(model.config),
                   eos_ids=_eos_ids(model, tokenizer), pad_id=_pad_id(tokenizer),
                   end_of_turn_ids=end_of_turn_ids(tokenizer))


PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weights(path: str) -> None:
    """ValueError naming the fix unless `path` holds safetensors weights. Pickled checkpoints
    (pytorch_model.bin, *.pt) are never loaded: unpickling a file can run any code in it."""
    if not os.path.isdir(path):
        raise ValueError(f"model directory {path} does not exist")
    names = sorted(os.listdir(path))
    if any(f.endswith(".safetensors") for f in names):
        return
    pickles = [f for f in names if f.endswith(PICKLE_WEIGHTS)]
    if pickles:
        raise ValueError(
            f"{path} holds only pickled weights ({', '.join(pickles[:3])}), which raydistill "
            "never loads (unpickling can run arbitrary code); if you trust the file, convert it "
            "once: AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, "
            "safe_serialization=True)")
    raise ValueError(f"{path} has no .safetensors weights; save the model with "
                     "save_pretrained(..., safe_serialization=True)")


def encode_prompt(student: Student, prompt: str) -> list[int]:
    """The prompt's token ids as the model sees them (the tokenizer's special tokens included)."""
    return list(student.tokenizer(prompt, add_special_tokens=True)["input_ids"])


def decode_text(student: Student, ids: list[int]) -> str:
    """Generated ids as text, special tokens dropped, no whitespace clean-up (so the text of a
    longer prefix of ids always extends the text of a shorter one, except for U+FFFD tails)."""
    return student.tokenizer.decode(ids, skip_special_tokens=True,
                                    clean_up_tokenization_spaces=False)


def decode_batch(student: Student, prompts: list[list[int]],
                 params: list[Sampling]) -> Iterator[list[Delta | None]]:
    """Decode `prompts` together; yields per step one entry per prompt (see module docstring)."""
    if len(prompts) != len(params) or not prompts:
        raise ValueError(f"need one Sampling per prompt, got {len(prompts)} prompts and "
                         f"{len(params)} Sampling")
    rows = [_Row(student, p) for p in params]
    ids, mask, positions = _left_pad(prompts, pad_id=student.pad_id)
    cache = _new_cache(student.model)
    active = list(range(len(prompts)))  # batch row j decodes request active[j]
    with torch.inference_mode():
        logits = _forward(student.model, ids, mask, positions, cache)
        positions = positions[:, -1:] + 1
        while True:
            tokens = [rows[i].sample(logits[j]) for j, i in enumerate(active)]
            out: list[Delta | None] = [None] * len(rows)
            keep = []
            for j, i in enumerate(active):
                out[i] = rows[i].push(tokens[j])
                if out[i].finish_reason is None:
                    keep.append(j)
            yield out
            if not keep:
                return
            if len(keep) < len(active):
                index = torch.tensor(keep)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                active = [active[j] for j in keep]
                tokens = [tokens[j] for j in keep]
            ids = torch.tensor(tokens).unsqueeze(1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = _forward(student.model, ids, mask, positions, cache)
            positions = positions + 1


def generate_text(student: Student, prompt: str, sampling: Sampling) -> tuple[str, str, int]:
    """One prompt, decoded alone: (text, finish_reason, completion tokens). For tests and scripts."""
    text, last = "", None
    for deltas in decode_batch(student, [encode_prompt(student, prompt)], [sampling]):
        last = deltas[0]
        text += last.text
    return text, last.finish_reason, last.tokens


class _Row:
    """One request's decoding state: its generator, generated ids and how much text is out."""

    def __init__(self, student: Student, params: Sampling):
        self.student, self.params = student, params
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator()
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def sample(self, logits: torch.Tensor) -> int:
        """logits: [vocab] → the next token id."""
        if self.generator is None:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / self.params.temperature, dim=-1)
        if self.params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs >= self.params.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def push(self, token: int) -> Delta:
        """Record `token`; the text it releases and whether the row is done."""
        self.ids.append(token)
        eos = token in self.student.eos_ids or token in self.params.stop_ids
        text = decode_text(self.student, self.ids[:-1] if eos else self.ids)
        cut = _first_stop(text, self.params.stop)
        if cut is not None:
            return self._finish(text[:cut], "stop")
        if eos:
            return self._finish(text, "stop")
        if len(self.ids) >= self.params.max_tokens:
            return self._finish(text, "length")
        end = _safe_end(text, self.params.stop)
        new = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return Delta(text=new, tokens=len(self.ids))

    def _finish(self, text: str, reason: str) -> Delta:
        new = text[self.sent:] if len(text) > self.sent else ""
        self.sent = len(text)
        return Delta(text=new, tokens=len(self.ids), finish_reason=reason)


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be emitted now: not a trailing U+FFFD run (an incomplete UTF-8
    sequence) and not a tail that could still grow into a stop string."""
    end = len(text.rstrip(REPLACEMENT))
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), held, -1):
            if text.endswith(stop[:k], 0, end):
                held = k
                break
    return end - held


def _left_pad(prompts: list[list[int]], *, pad_id: int):
    """ids, attention_mask, position_ids: each [batch, longest prompt]."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids, mask, positions


def _forward(model, ids, mask, positions, cache) -> torch.Tensor:
    """The last position's logits: [batch, vocab], fp32."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :].float()


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _context(config) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
        if ids:
            break
    if not ids and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0
