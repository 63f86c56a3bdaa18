"""Build small, real causal LMs (Llama and the other FAMILIES) and BPE tokenizers from local text.

Used by `raydistill demo` (the demo teacher) and by the tests: nothing here downloads anything.
vLLM's CPU attention kernels reject small head sizes (head_dim=16 fails), so every model built here
keeps `hidden // heads == 64`.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


def stdlib_sources(*, include_tests: bool = False) -> list[Path]:
    """Every `.py` file of this Python's standard library, sorted, `test*` folders excluded.

    About 740 files and ~12 MB of code on CPython 3.11: enough text to train a small teacher
    that does not overfit within minutes.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if "site-packages" in parts or "idlelib" in parts:
            continue
        if not include_tests and any(p.startswith("test") for p in parts):
            continue
        files.append(path)
    return files


def held_out(path: Path) -> bool:
    """A stable 5% split by file name (md5), so the held-out modules never change between runs."""
    return hashlib.md5(str(path.name).encode()).digest()[0] < 13


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 4096):
    """Train a byte-level BPE tokenizer on `texts` and save it as a HF fast tokenizer in `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.model_max_length = 1 << 20
    fast.save_pretrained(str(out_dir))
    return fast


def llama_config(
    vocab_size: int,
    *,
    layers: int = 2,
    hidden: int = 128,
    heads: int = 2,
    intermediate: int | None = None,
    max_positions: int = 512,
    tie_embeddings: bool = False,
):
    """A Llama config with head_dim = hidden // heads (keep it 64 for vLLM's CPU kernels)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        rms_norm_eps=1e-5,
    )


# Each family's tiny shape keeps its real per-layer features: a mix of sliding-window and full
# attention layers where the family has `layer_types`, grouped-query attention (kv_heads < heads),
# q/k norms (Qwen3, OLMo 2, Gemma 3 have them by design), fused qkv (Phi-3), logit softcapping and
# tied embeddings (Gemma); docs/models.md lists them. The sliding window is short (SLIDING_WINDOW tokens) so that test
# sequences longer than it exercise it.
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "olmo2")
SLIDING_WINDOW = 32


def family_config(family: str, vocab_size: int, *, layers: int = 3, hidden: int = 128,
                  heads: int = 2, kv_heads: int | None = None, intermediate: int | None = None,
                  max_positions: int = 512):
    """A tiny config of `family` (a transformers model_type, one of FAMILIES), head_dim 64.

    kv_heads defaults to 1 (grouped-query attention) for families that use GQA, heads otherwise.
    Token ids follow train_tokenizer: bos 1, eos 2, pad 3.
    """
    from transformers import AutoConfig

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if hidden // heads != 64 or hidden % heads:
        raise ValueError(f"hidden // heads must be 64 (vLLM's CPU kernels), got {hidden}/{heads}")
    mixed = [("sliding_attention" if i % 2 == 0 else "full_attention") for i in range(layers)]
    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, intermediate_size=intermediate or 4 * hidden,
                  max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2,
                  pad_token_id=3)
    gqa = dict(num_key_value_heads=kv_heads or 1)
    extra: dict = {
        "llama": dict(num_key_value_heads=kv_heads or heads, rms_norm_eps=1e-5),
        # released Qwen2/3 checkpoints do not slide (use_sliding_window=False) but still carry
        # a per-layer `layer_types` list; vLLM refuses a Qwen2 mixing sliding and full layers
        "qwen2": dict(gqa, use_sliding_window=False),
        "qwen3": dict(gqa, head_dim=64, use_sliding_window=False),
        "mistral": dict(gqa, head_dim=64, sliding_window=SLIDING_WINDOW),
        "gemma2": dict(gqa, head_dim=64, query_pre_attn_scalar=64, sliding_window=SLIDING_WINDOW,
                       layer_types=mixed, tie_word_embeddings=True),
        "gemma3_text": dict(gqa, head_dim=64, query_pre_attn_scalar=64,
                            sliding_window=SLIDING_WINDOW, layer_types=mixed,
                            tie_word_embeddings=True),
        "phi3": dict(gqa, original_max_position_embeddings=max_positions),
        "olmo2": dict(gqa),
    }[family]
    return AutoConfig.for_model(family, **common, **extra)


def build_model(config, out_dir: str | Path | None = None, *, seed: int = 0):
    """A randomly initialised causal LM of `config`'s family (fp32), saved as safetensors when
    `out_dir` is given."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if out_dir is not None:
        model.save_pretrained(str(out_dir), safe_serialization=True)
    return model


def sharpen(model, *, scale: float = 4.0) -> None:
    """Scale the LM head so a random model's next-token distributions are peaked, like a trained
    model's, instead of nearly uniform (which makes top-k ties and flat log-probs everywhere)."""
    import torch

    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)  # tied: the input embedding too


def chunks_of_text(files: Iterable[Path], *, max_chars: int = 4000) -> Iterator[str]:
    """Yield the files' text in pieces of at most `max_chars` characters, split at line ends."""
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        start = 0
        while start < len(text):
            end = min(len(text), start + max_chars)
            cut = text.rfind("\n", start, end) if end < len(text) else end
            end = cut + 1 if cut > start else end
            yield text[start:end]
            start = end


def encode_files(tokenizer, files: Iterable[Path]) -> list[int]:
    """All the files' text as one token stream."""
    ids: list[int] = []
    for text in chunks_of_text(files, max_chars=100_000):
        ids.extend(tokenizer(text)["input_ids"])
    return ids


def train_lm(model, ids: list[int], *, max_steps: int | None = None, max_seconds: float | None = None,
             lr: float = 2e-3, batch: int = 16, seq: int = 128, seed: int = 0,
             on_step=None) -> int:
    """Next-token training on random windows of `ids` (AdamW, warm-up then cosine decay to 10%)
    until `max_steps` or `max_seconds`, whichever comes first. Returns the steps taken.

    on_step(step, fraction_done, smoothed_loss) is called after every step (progress display).
    """
    import math
    import time

    import torch

    if max_steps is None and max_seconds is None:
        raise ValueError("train_lm needs max_steps or max_seconds")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    data = torch.tensor(ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    step, start, loss_avg = 0, time.time(), None

    def done_fraction() -> float:
        by_steps = step / max_steps if max_steps else 0.0
        by_time = (time.time() - start) / max_seconds if max_seconds else 0.0
        return max(by_steps, by_time)

    while (frac := done_fraction()) < 1.0:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, frac / 0.03) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        idx = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[i:i + seq + 1] for i in idx.tolist()])
        loss = model(input_ids=x, labels=x).loss  # HF shifts the labels by one
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        if on_step is not None:
            on_step(step, min(1.0, done_fraction()), loss_avg)
    model.eval()
    return step


def heldout_nats(model, ids: list[int], *, seq: int = 128, windows: int = 64) -> float:
    """Mean next-token cross-entropy (nats/token) on evenly spaced held-out windows."""
    import torch

    step = max(1, (len(ids) - seq - 1) // windows)
    starts = list(range(0, len(ids) - seq - 1, step))[:windows]
    x = torch.tensor([ids[s:s + seq + 1] for s in starts])
    with torch.no_grad():
        logits = model(input_ids=x[:, :-1]).logits
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()))


def unigram_nats(train: list[int], test: list[int], vocab: int) -> float:
    """Cross-entropy of an add-one unigram model of `train` on `test`: the floor a teacher beats."""
    import numpy as np

    counts = np.bincount(np.asarray(train), minlength=vocab).astype(np.float64) + 1.0
    return float(-np.log(counts / counts.sum())[np.asarray(test)].mean())
