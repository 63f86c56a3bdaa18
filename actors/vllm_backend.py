"""vLLM teacher backend: a real vLLM engine (CPU build here, CUDA build on GPU clusters).

Score mode, `scoring="hidden"` (default): the engine runs as a pooling model that returns the final
hidden state of every position as one tensor; the LM head — weight, bias, soft cap and logit scale
as the model's checkpoint and config give them — log-sum-exp and top-k are then applied here,
chunk by chunk (`softlabels.topk_from_hidden`). vLLM's own `prompt_logprobs` path builds a Python
object per position and rank, which caps it at ~0.2× the model's forward speed; the hidden path
keeps everything in tensors. At start, `self_check` scores one sequence through this head and
through vLLM's own (actors/vllm_head_check.py) and refuses to start when they disagree.
`scoring="prompt_logprobs"` uses vLLM's path (for heads the fast path refuses). Sample mode uses
vLLM's sampler with `logprobs=k` (flat form). vLLM is imported here only, so `import actors` stays
fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from actors.backend import stop_list
from orchestrator.errors import RaydistillError
from orchestrator.kd.softlabels import SoftLabels, TopK, flat_logprobs_to_arrays, head_transform, topk_from_hidden

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HeadCheckError(RaydistillError):
    """The hidden path's head disagrees with vLLM's own log-probs: the teacher would be wrong."""


SELF_CHECK_TOLERANCE = 0.01
"""Nats, max over the top-k log-probs of the self-check sequence. Both sides start from the same
bf16 hidden states and the same head weights; the fast path's only other difference is its
log-sum-exp over bf16 exponentials (~1e-3 nat, orchestrator/kd/softlabels.py), so anything above
0.01 nat — the shards' own storage step is 1/51 nat — is a different head (a dropped bias, scale,
soft cap or a wrong weight), not rounding."""
_CHECK_K = 20


class VLLMBackend:
    def __init__(self, model_path: str, *, mode: str, k: int, dtype: str = "auto",
                 scoring: str = "hidden", memory_fraction: float = 0.15,
                 kv_cache_gib: float | None = None,
                 max_model_len: int | None = None, tensor_parallel_size: int = 1, seed: int = 0,
                 chunk_rows: int = 512, revision: str | None = None,
                 tail_temperatures: tuple[float, ...] = ()):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        self.dtype = dtype if dtype != "auto" else "bfloat16"
        self.scoring = scoring if mode == "score" else "sample"
        self.chunk_rows = chunk_rows
        self.tail_temperatures = tuple(tail_temperatures)
        if self.tail_temperatures and self.scoring != "hidden":
            raise NotImplementedError(
                "teacher.tail_temperatures needs the full distribution: use teacher.mode=score "
                "with teacher.scoring=hidden, or teacher.backend=hf (vLLM returns only the top-k)")
        self.device = "cuda" if on_gpu else "cpu"
        self.model_path = model_path
        common = dict(model=model_path, revision=revision, dtype=self.dtype, seed=seed,
                      gpu_memory_utilization=memory_fraction, max_model_len=max_model_len,
                      tensor_parallel_size=tensor_parallel_size, enforce_eager=not on_gpu)
        if kv_cache_gib is not None:
            common["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
        if self.scoring == "hidden":
            from vllm.config import PoolerConfig

            config = json.loads((Path(model_path) / "config.json").read_text())
            self.head_args = head_transform(config, fix="set teacher.scoring=prompt_logprobs")
            weight, bias = load_head_tensors(Path(model_path))
            self.llm = LLM(runner="pooling", pooler_config=PoolerConfig(
                task="token_embed", pooling_type="ALL", use_activation=False),
                worker_extension_cls="actors.vllm_head_check.HeadReference", **common)
            self.head = weight.to(self.device, _DTYPES[self.dtype])
            self.bias = None if bias is None else bias.to(self.device, _DTYPES[self.dtype])
        else:
            self.llm = LLM(runner="generate", max_logprobs=max(k, 20), **common)
            self.head = None
        model_config = self.llm.llm_engine.model_config
        self.vocab_size = int(model_config.get_vocab_size())
        self.max_length = int(model_config.max_model_len)
        self.max_k = self.vocab_size if self.scoring == "hidden" else max(k, 20)
        if self.scoring == "hidden":
            self.self_check()

    def self_check(self) -> dict:
        """Score one short sequence through the fast path and through vLLM's own head (its model
        class's compute_logits + fp32 log-softmax, as prompt_logprobs computes them) on the same
        hidden states and dtype; refuse to start when they differ by more than
        SELF_CHECK_TOLERANCE. Returns {"max_nats", "mean_nats"}."""
        k = min(_CHECK_K, self.vocab_size)
        seq = [(1 + 7919 * i) % self.vocab_size for i in range(24)]
        hidden = self._hidden([seq])[0]
        fast = self._topk(hidden, k=k, targets=None).logprobs
        answers = self.llm.collective_rpc("raydistill_head_logprobs",
                                          args=(hidden.float().cpu().tolist(), k, self.model_path))
        ref = torch.tensor(next(a for a in answers if a is not None)[1])
        err = (fast - ref).abs()
        result = {"max_nats": float(err.max()), "mean_nats": float(err.mean())}
        if result["max_nats"] > SELF_CHECK_TOLERANCE:
            raise HeadCheckError(
                f"the fast scoring path disagrees with vLLM's own log-probs for {self.model_path}: "
                f"max {result['max_nats']:.4f} nat, mean {result['mean_nats']:.4f} nat over the "
                f"top-{k} of a test sequence (allowed {SELF_CHECK_TOLERANCE} nat, {self.dtype}); "
                "this teacher's LM head is not what the fast path computes. Set "
                "teacher.scoring=prompt_logprobs")
        return result

    def _hidden(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Final hidden states [T, H] of each sequence (vLLM's pooling runner, every position)."""
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(s)) for s in sequences]
        outs = self.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
        return [out.outputs.data.to(self.device) for out in outs]

    def _topk(self, hidden: torch.Tensor, *, k: int, targets: torch.Tensor | None) -> TopK:
        return topk_from_hidden(hidden, self.head, k=k, targets=targets, chunk_rows=self.chunk_rows,
                                bias=self.bias, tail_temperatures=self.tail_temperatures,
                                **self.head_args)

    def score(self, sequences: list[list[int]], *, k: int) -> list[SoftLabels]:
        from vllm.inputs import TokensPrompt

        if self.scoring == "hidden":
            results = []
            for seq, hidden in zip(sequences, self._hidden(sequences)):
                targets = torch.tensor(list(seq[1:]) + [-1], device=self.device)
                top = self._topk(hidden, k=k, targets=targets)
                results.append(SoftLabels(np.asarray(seq, dtype=np.int32), 0, 0, top.ids.numpy(),
                                          top.logprobs.numpy(), top.target_logprobs.numpy(),
                                          top.tail_mass.numpy(), (1.0, *self.tail_temperatures)))
            return results
        from vllm import SamplingParams

        prompts = [TokensPrompt(prompt_token_ids=list(s)) for s in sequences]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, logprobs=k,
                                flat_logprobs=True)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for seq, out in zip(sequences, outs):
            T = len(seq)
            ids, lps, tlp, tail = flat_logprobs_to_arrays(out.prompt_logprobs, range(1, T), k=k)
            last = out.outputs[0].logprobs
            l_ids, l_lps, _, l_tail = flat_logprobs_to_arrays(last, range(0, 1), k=k,
                                                              has_target=False)
            results.append(SoftLabels(np.asarray(seq, dtype=np.int32), 0, 0,
                                      np.concatenate([ids, l_ids]), np.concatenate([lps, l_lps]),
                                      np.concatenate([tlp, [np.nan]]).astype(np.float32),
                                      np.concatenate([tail, l_tail])))
        return results

    def sample(self, prompts: list[list[int]], *, k: int, n: int, temperature: float, top_p: float,
               max_new_tokens: int, seeds: list[int], eos_id: int | list[int] | None
               ) -> list[list[SoftLabels]]:
        """`eos_id`: the token, or tokens, that end a continuation (e.g. EOS and end-of-turn)."""
        from vllm import SamplingParams

        from vllm.inputs import TokensPrompt

        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, seed=s,
                                 max_tokens=max_new_tokens, logprobs=k, flat_logprobs=True,
                                 stop_token_ids=stop_list(eos_id) or None)
                  for s in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                 use_tqdm=False)
        results = []
        for prompt, out in zip(prompts, outs):
            per_prompt = []
            for comp in sorted(out.outputs, key=lambda c: c.index):
                toks = list(comp.token_ids)
                ids, lps, tlp, tail = flat_logprobs_to_arrays(comp.logprobs, range(len(toks)), k=k)
                seq = np.asarray(list(prompt) + toks, dtype=np.int32)
                per_prompt.append(SoftLabels(seq, len(prompt), len(prompt) - 1, ids, lps, tlp,
                                             tail))
            results.append(per_prompt)
        return results

    def close(self) -> None:
        """Stop the engine-core process now rather than whenever the LLM object is collected."""
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm


def load_head_tensors(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight [vocab, hidden] (the input embedding when tied) and bias [vocab] (None
    when the head has none) from the checkpoint's safetensors files."""
    from safetensors import safe_open

    config = json.loads((Path(model_dir) / "config.json").read_text())
    tied = config.get("tie_word_embeddings", False)
    wanted = ["model.embed_tokens.weight"] if tied else ["lm_head.weight"]
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors weights")
    found: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in (*wanted, "lm_head.bias"):
                if name in fh.keys():
                    found[name] = fh.get_tensor(name)
    weight = next((found[n] for n in wanted if n in found), None)
    if weight is None:
        raise KeyError(f"{model_dir}: none of {wanted} found in the safetensors files; "
                       "set teacher.scoring=prompt_logprobs")
    return weight, found.get("lm_head.bias")
