"""Dataset reading: JSONL records with a stable id, checked line by line before any compute.

A record is one JSON object per line, in one of three formats (`data.format`): `{"text"}`,
`{"prompt", "completion"}` or `{"messages": [{"role", "content"}, ...]}`; `auto` decides per file
from its first record and refuses a file that mixes them. In `score` mode a record is scored (only
its completion / assistant tokens are learned: `orchestrator.chat`); in `sample` mode it is a
prompt. Records are grouped, in file order, into fixed work units of `samples_per_shard` records —
unit i always holds the same records, which is what makes resume exactly-once.
"""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import DataError


FORMATS = ("text", "completion", "chat")


@dataclass(frozen=True)
class Record:
    sample_id: str
    text: str
    """The text (text records) or the prompt (completion records); "" for chat records."""
    completion: str | None = None
    """Completion records: the completion (the tokens that are learned)."""
    messages: tuple[tuple[str, str], ...] | None = None
    """Chat records: (role, content) of each message, in order."""

    @property
    def format(self) -> str:
        return "chat" if self.messages is not None else (
            "completion" if self.completion is not None else "text")

    @property
    def content(self) -> str:
        """All of the record's text, one string (what duplicate checks compare)."""
        if self.messages is not None:
            return json.dumps(self.messages, ensure_ascii=False)
        return self.text + (self.completion or "")


@dataclass(frozen=True)
class ScanResult:
    files: list[Path]
    records: int
    skipped: list[str]
    """`file:line: reason` of each skipped bad line (on_bad_line=skip)."""
    formats: frozenset[str] = frozenset()
    """The formats of the records read (`FORMATS`)."""


def dataset_files(path: str, *, key: str = "data.path") -> list[Path]:
    """The JSONL files `path` names: a file, a directory (its *.jsonl, sorted) or a glob.
    `key` is the config field that named `path` (`data.path`, `data.eval_path`): errors say it."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.glob("*.jsonl") if f.is_file())
        if not files:
            raise DataError(f"{key} {path} is a directory without *.jsonl files; "
                            f"put the dataset there as JSON lines or point {key} at the file")
        return files
    matches = sorted(Path(m) for m in glob.glob(path) if Path(m).is_file())
    if matches:
        return matches
    raise DataError(f"{key} {path} does not exist; point it at a JSONL file "
                    "(one JSON object per line, e.g. {\"text\": \"...\"})")


def iter_records(files: list[Path], *, field: str, fallback_field: str | None, id_field: str,
                 on_bad_line: str, limit: int | None = None, skipped: list[str] | None = None,
                 keep=None, key: str = "data.path", format: str = "text",
                 prompt_field: str = "prompt", mode: str = "score", train_on_prompt: bool = True):
    """Yield `Record`s in file order; a bad line raises `DataError` (stop) or is noted (skip).
    `keep(sample_id)`, if given, selects a split (e.g. train vs. held-out) before `limit` counts.
    `key`: the config field that named the files, for the messages. `format`: `text` (the text
    in `field`, else `fallback_field`), `completion` (`prompt_field` and "completion"), `chat`
    ("messages"), or `auto`: each file's first record decides, and a record of another format
    in that file is refused (whatever on_bad_line says: the file mixes formats). A chat record
    must leave something to learn: an assistant message in `score` mode (unless
    `train_on_prompt`), a message before the reply in `sample` mode."""
    count = 0
    seen_ids: dict[str, str] = {}
    for path in files:
        file_format, first = (None, None) if format == "auto" else (format, None)
        for line_no, line, problem in _lines(path, key=key):
            if problem is None:
                if not line.strip():
                    continue
                obj, problem = _json(line)
            if problem is None:
                found = _format_of(obj)
                if file_format is None:
                    file_format, first = found, line_no
                elif first is not None and found != file_format:
                    raise DataError(
                        f"{path}:{line_no}: a {found} record in a file of {file_format} records "
                        f"(data.format=auto decided from line {first}); one file holds one "
                        "format — move these records to a file of their own, or set data.format "
                        "to the one you mean (records of another format are then bad lines)")
                record, problem = _parse(obj, file_format, field, fallback_field, prompt_field,
                                         id_field, path, line_no)
                if record is not None and record.messages is not None:
                    problem = _chat_problem(record.messages, mode, train_on_prompt)
            if problem is not None:
                _bad(f"{path}:{line_no}: {problem}", on_bad_line, skipped)
                continue
            where = f"{path}:{line_no}"
            if record.sample_id in seen_ids:
                raise DataError(
                    f"{where}: id {record.sample_id!r} was already used at "
                    f"{seen_ids[record.sample_id]}; sample ids must be unique — fix the "
                    f"dataset or drop the '{id_field}' field to use file:line ids")
            seen_ids[record.sample_id] = where
            if keep is not None and not keep(record.sample_id):
                continue
            yield record
            count += 1
            if limit is not None and count >= limit:
                return


def _lines(path: Path, *, key: str):
    """(line number, text, problem) of each line of a JSONL file, read as bytes and decoded one
    line at a time, so a line that is not UTF-8 is named exactly and the lines around it are kept.
    A UTF-8 byte-order mark at the start of the file is dropped."""
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise DataError(f"{key} file {path} cannot be read ({e.strerror or e}); check the file's "
                        f"permissions{_or_point(key)}") from None
    with fh:
        for line_no, raw in enumerate(fh, start=1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield line_no, raw.decode("utf-8"), None
            except UnicodeDecodeError as e:
                yield line_no, "", (f"not UTF-8 text (byte {e.start + 1} of the line: {e.reason}); "
                                    "save the file as UTF-8")


def _or_point(key: str) -> str:
    """` or point data.path elsewhere` for a config field; `` for files raydistill wrote."""
    return f" or point {key} elsewhere" if key.startswith("data.") else ""


def _json(line: str):
    """(the line's JSON object, None) or (None, what is wrong with the line)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
    except (ValueError, RecursionError) as e:  # e.g. an integer of more than 4300 digits
        return None, f"malformed JSON ({str(e)[:80] or type(e).__name__})"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    return obj, None


def _format_of(obj: dict) -> str:
    """A record's format by its keys: "messages": chat, "completion": completion, else text."""
    return "chat" if "messages" in obj else "completion" if "completion" in obj else "text"


def _parse(obj: dict, format: str, field: str, fallback: str | None, prompt_field: str,
           id_field: str, path: Path, line_no: int):
    raw_id = obj.get(id_field)
    sample_id = str(raw_id) if raw_id is not None else f"{path.name}:{line_no}"
    if format == "chat":
        messages, problem = _messages(obj.get("messages"))
        return (None, problem) if problem else (Record(sample_id, "", messages=messages), None)
    if format == "completion":
        prompt, problem = _string(obj, prompt_field, None)
        completion, problem = (None, problem) if problem else _string(obj, "completion", None)
        return (None, problem) if problem else (Record(sample_id, prompt, completion), None)
    text, problem = _string(obj, field, fallback)
    return (None, problem) if problem else (Record(sample_id, text), None)


def _chat_problem(messages, mode: str, train_on_prompt: bool) -> str | None:
    roles = [role for role, _ in messages]
    if mode == "score" and not train_on_prompt and "assistant" not in roles:
        return ("a chat record without an 'assistant' message has nothing to learn; add the "
                "reply, or set data.train_on_prompt=true to learn every token")
    if mode == "sample" and roles[:-1 if roles[-1] == "assistant" else None] == []:
        return "a chat record with no message before the assistant's has no prompt to answer"
    return None


def _string(obj: dict, field: str, fallback: str | None):
    """(the non-empty string in `field`, else in `fallback`, None) or (None, the problem)."""
    text = obj.get(field)
    if text is None and fallback:
        text = obj.get(fallback)
    if not isinstance(text, str):
        names = field if not fallback or fallback == field else f"{field} (or {fallback})"
        if text is None:
            return None, f"missing string field '{names}'"
        return None, f"field '{names}' must be a string, got {type(text).__name__}"
    if not text:
        return None, f"empty '{field}'"
    return text, _surrogate(text, field)


def _surrogate(text: str, field: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate escape ("\ud800"): no tokenizer takes it
        return (f"'{field}' holds an unpaired surrogate escape ({text[e.start]!a} at "
                f"character {e.start + 1}), which is not text")
    return None


def _messages(raw):
    """((role, content), ...) of a chat record's "messages", or (None, the problem)."""
    if not isinstance(raw, list) or not raw:
        return None, ("'messages' must be a non-empty list of {\"role\", \"content\"} objects, "
                      f"got {type(raw).__name__ if raw != [] else 'an empty list'}")
    out = []
    for i, m in enumerate(raw, start=1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            return None, f"message {i} must be an object with a string 'role'"
        if not isinstance(m.get("content"), str):
            return None, f"message {i} ({m['role']}) needs a string 'content'"
        problem = _surrogate(m["content"], f"message {i} content")
        if problem:
            return None, problem
        out.append((m["role"], m["content"]))
    return tuple(out), None


def _bad(message: str, on_bad_line: str, skipped: list[str] | None) -> None:
    if on_bad_line == "stop":
        raise DataError(f"{message}. Fix the line, or set data.on_bad_line=skip to skip bad lines "
                        "(they are counted and reported)")
    if skipped is not None:
        skipped.append(message)


def scan(path: str, *, field: str, fallback_field: str | None, id_field: str, on_bad_line: str,
         limit: int | None, keep=None, key: str = "data.path", **formats) -> ScanResult:
    """Read the whole dataset once before compute: count records, find bad lines, refuse empty.
    `key`: the config field that names `path`, for the messages; `formats`: `iter_records`'s
    format, prompt_field, mode and train_on_prompt."""
    files = dataset_files(path, key=key)
    skipped: list[str] = []
    n, found = 0, set()
    for record in iter_records(files, field=field, fallback_field=fallback_field,
                               id_field=id_field, on_bad_line=on_bad_line, limit=limit,
                               skipped=skipped, keep=keep, key=key, **formats):
        n += 1
        found.add(record.format)
    if n == 0:
        extra = f" ({len(skipped)} bad lines skipped)" if skipped else ""
        what = {"chat": "a non-empty 'messages' list", "completion": "non-empty 'prompt' and "
                "'completion' strings"}.get(formats.get("format", "text"),
                                            f"a non-empty '{field}' string")
        raise DataError(f"{key} {path} holds no usable records{extra}; each line must be a "
                        f"JSON object with {what}")
    return ScanResult(files, n, skipped, frozenset(found))


def content_digest(files: list[Path], *, key: str = "data.path") -> dict:
    """What a capture's fingerprint knows of its data: the sha256 of each file's name and bytes,
    in order, read in 1 MiB blocks — {"sha256": hex, "files": [{"name", "bytes"}]}.

    By content, not path: a dataset moved or copied elsewhere with the same bytes keeps its
    captures; one edited (even keeping its size and mtime) does not. The file *name* counts
    (records without an id are `<file name>:<line>`), its directory does not. Cost: one streamed
    read, ~0.08 s per 100 MB here — the pre-flight scan that parses every line takes ~1.2 s.
    `key`: the config field that named the files, for the messages.
    """
    import hashlib

    h = hashlib.sha256()
    listed = []
    for path in files:
        h.update(f"{path.name}\0".encode())
        size = 0
        try:
            with open(path, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
                    size += len(block)
        except OSError as e:
            raise DataError(f"{key} file {path} cannot be read ({e.strerror or e}); check the "
                            f"file's permissions{_or_point(key)}") from None
        h.update(f"\0{size}\0".encode())
        listed.append({"name": path.name, "bytes": size})
    return {"sha256": h.hexdigest(), "files": listed}


def units(records, size: int):
    """Group records into (unit_index, [Record, ...]) of `size` records, in order."""
    batch: list[Record] = []
    index = 0
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield index, batch
            index, batch = index + 1, []
    if batch:
        yield index, batch


def stable_fraction(sample_id: str) -> float:
    """A sample id's fixed place in [0, 1): decides the held-out split the same way everywhere."""
    digest = hashlib.sha256(sample_id.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64
