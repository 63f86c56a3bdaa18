"""What the driver learns about a teacher before starting any actor: that it exists and loads, its
vocabulary, context length, tokenizer fingerprint and revision. Cheap: no weights are loaded."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import ConfigError


@dataclass(frozen=True)
class TeacherInfo:
    vocab_size: int
    max_positions: int
    tokenizer_fingerprint: str
    revision: str
    eos_id: int | None


_GENERIC_TOKENIZERS = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(model: str, *, revision: str | None = None, what: str = "teacher.model"):
    """The model's tokenizer, exactly as its files declare it.

    HACK (transformers 5.x): `AutoTokenizer` picks a tokenizer class by the model's `model_type`
    for some families even when tokenizer_config.json declares the generic fast tokenizer — a Qwen2
    model directory with its own tokenizer.json comes back as `Qwen2Tokenizer`, rebuilt from the
    vocabulary with Qwen's pre-tokenizer, and encodes text into other ids than its tokenizer.json
    does, silently. A declared generic class is therefore loaded as that class (tokenizer.json
    as saved); a family's own declared class still goes through AutoTokenizer.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, local_files_only=True)
        if (_declared_class(model, revision) in _GENERIC_TOKENIZERS
                and type(tokenizer).__name__ not in _GENERIC_TOKENIZERS):
            tokenizer = PreTrainedTokenizerFast.from_pretrained(model, revision=revision,
                                                                local_files_only=True)
        return tokenizer
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what} {model}: its tokenizer cannot be loaded ({_first_line(e)}); "
                          "the model directory needs tokenizer.json / tokenizer_config.json") from None


def _declared_class(model: str, revision: str | None) -> str | None:
    """`tokenizer_class` of the model's tokenizer_config.json (local directory or HF cache)."""
    from transformers.utils import cached_file

    path = cached_file(model, "tokenizer_config.json", revision=revision, local_files_only=True,
                       _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary and special tokens: equal fingerprints ⇔ same token ids."""
    blob = json.dumps([sorted(tokenizer.get_vocab().items()),
                       sorted(map(str, tokenizer.all_special_tokens))]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def inspect_teacher(model: str, *, revision: str | None = None) -> TeacherInfo:
    """Raise a ConfigError naming the fix if the model is missing or unloadable."""
    config = model_config(model, revision=revision, key="teacher.model")
    path = Path(model)
    tokenizer = load_tokenizer(model, revision=revision)
    vocab = int(getattr(config, "vocab_size", 0) or len(tokenizer))
    if len(tokenizer) > vocab:
        raise ConfigError(f"teacher.model {model}: tokenizer has {len(tokenizer)} tokens but the "
                          f"model only {vocab}; they do not belong together")
    return TeacherInfo(
        vocab_size=vocab,
        max_positions=int(getattr(config, "max_position_embeddings", 2048)),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        revision=revision or _local_revision(path),
        eos_id=tokenizer.eos_token_id,
    )


def model_config(model: str, *, revision: str | None, key: str):
    """The transformers config of a model that `key` names, checked to be there with weights, or
    a ConfigError naming `key`, the model and the fix (nothing is downloaded)."""
    from transformers import AutoConfig

    path = Path(model)
    if not path.exists() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise ConfigError(f"{key} {model} does not exist; set it to a model directory "
                          "(config.json, weights, tokenizer) or a hub id in the local HF cache")
    try:
        config = AutoConfig.from_pretrained(model, revision=revision, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key} {model} cannot be loaded ({_first_line(e)}); it must be a "
                          "Hugging Face model directory with config.json, or a hub id already in "
                          "the local cache (this machine does not download)") from None
    if path.is_dir() and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ConfigError(f"{key} {model} has a config.json but no weights (*.safetensors); "
                          "save the model with save_pretrained")
    return config


def _local_revision(path: Path) -> str:
    """A content id for a local model: its config plus the names and sizes of its weight files."""
    if not path.is_dir():
        return "unknown"
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return "local-" + h.hexdigest()[:12]


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
