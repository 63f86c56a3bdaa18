"""vLLM teacher backend: a real vLLM engine (CPU build here, CUDA build on GPU clusters).

Score mode, `scoring="hidden"` (default): the engine runs as a pooling model that returns the final
hidden state of every position as one tensor; the LM head, log-sum-exp and top-k are then applied
here, chunk by chunk (`softlabels.topk_from_hidden`). vLLM's own `prompt_logprobs` path builds a
Python object per position and rank, which caps it at ~0.2× the model's forward speed; the hidden
path keeps everything in tensors. `scoring="prompt_logprobs"` uses vLLM's path (for heads that are
not a plain linear layer). Sample mode uses vLLM's sampler with `logprobs=k` (flat form).
vLLM is imported here only, so `import actors` stays fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from orchestrator.softlabels import SoftLabels, flat_logprobs_to_arrays, topk_from_hidden

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class VLLMBackend:
    def __init__(self, model_path: str, *, mode: str, k: int, dtype: str = "auto",
                 scoring: str = "hidden", memory_fraction: float = 0.15,
                 kv_cache_gib: float | None = None,
                 max_model_len: int | None = None, tensor_parallel_size: int = 1, seed: int = 0,
                 chunk_rows: int = 512, revision: str | None = None):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        self.dtype = dtype if dtype != "auto" else "bfloat16"
        self.scoring = scoring if mode == "score" else "sample"
        self.chunk_rows = chunk_rows
        self.device = "cuda" if on_gpu else "cpu"
        common = dict(model=model_path, revision=revision, dtype=self.dtype, seed=seed,
                      gpu_memory_utilization=memory_fraction, max_model_len=max_model_len,
                      tensor_parallel_size=tensor_parallel_size, enforce_eager=not on_gpu)
        if kv_cache_gib is not None:
            common["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
        if self.scoring == "hidden":
            from vllm.config import PoolerConfig

            self.llm = LLM(runner="pooling", pooler_config=PoolerConfig(
                task="token_embed", pooling_type="ALL", use_activation=False), **common)
            self.head = _load_lm_head(Path(model_path)).to(self.device, _DTYPES[self.dtype])
        else:
            self.llm = LLM(runner="generate", max_logprobs=max(k, 20), **common)
            self.head = None
        model_config = self.llm.llm_engine.model_config
        self.vocab_size = int(model_config.get_vocab_size())
        self.max_length = int(model_config.max_model_len)
        self.max_k = self.vocab_size if self.scoring == "hidden" else max(k, 20)

    def score(self, sequences: list[list[int]], *, k: int) -> list[SoftLabels]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(s)) for s in sequences]
        if self.scoring == "hidden":
            outs = self.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
            results = []
            for seq, out in zip(sequences, outs):
                hidden = out.outputs.data.to(self.device)
                targets = torch.tensor(list(seq[1:]) + [-1], device=self.device)
                ids, lps, tlp = topk_from_hidden(hidden, self.head, k=k, targets=targets,
                                                 chunk_rows=self.chunk_rows)
                results.append(SoftLabels(np.asarray(seq, dtype=np.int32), 0, 0, ids.numpy(),
                                          lps.numpy(), tlp.numpy()))
            return results
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, logprobs=k,
                                flat_logprobs=True)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for seq, out in zip(sequences, outs):
            T = len(seq)
            ids, lps, tlp = flat_logprobs_to_arrays(out.prompt_logprobs, range(1, T), k=k)
            last = out.outputs[0].logprobs
            l_ids, l_lps, _ = flat_logprobs_to_arrays(last, range(0, 1), k=k, has_target=False)
            results.append(SoftLabels(np.asarray(seq, dtype=np.int32), 0, 0,
                                      np.concatenate([ids, l_ids]), np.concatenate([lps, l_lps]),
                                      np.concatenate([tlp, [np.nan]]).astype(np.float32)))
        return results

    def sample(self, prompts: list[list[int]], *, k: int, n: int, temperature: float, top_p: float,
               max_new_tokens: int, seeds: list[int], eos_id: int | None) -> list[list[SoftLabels]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, seed=s,
                                 max_tokens=max_new_tokens, logprobs=k, flat_logprobs=True,
                                 stop_token_ids=[eos_id] if eos_id is not None else None)
                  for s in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                 use_tqdm=False)
        results = []
        for prompt, out in zip(prompts, outs):
            per_prompt = []
            for comp in sorted(out.outputs, key=lambda c: c.index):
                toks = list(comp.token_ids)
                ids, lps, tlp = flat_logprobs_to_arrays(comp.logprobs, range(len(toks)), k=k)
                seq = np.asarray(list(prompt) + toks, dtype=np.int32)
                per_prompt.append(SoftLabels(seq, len(prompt), len(prompt) - 1, ids, lps, tlp))
            results.append(per_prompt)
        return results

    def close(self) -> None:
        """Stop the engine-core process now rather than whenever the LLM object is collected."""
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm


def _load_lm_head(model_dir: Path) -> torch.Tensor:
    """The LM head matrix [vocab, hidden] from the checkpoint (the input embedding when tied)."""
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text())
    if config.get("final_logit_softcapping") or config.get("logit_scale"):
        raise NotImplementedError(
            "this teacher's head is not a plain linear layer; set teacher.scoring=prompt_logprobs")
    tied = config.get("tie_word_embeddings", False)
    wanted = ["model.embed_tokens.weight"] if tied else ["lm_head.weight"]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors weights")
    for name in wanted:
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                if name in fh.keys():
                    return fh.get_tensor(name)
    raise KeyError(f"{model_dir}: none of {wanted} found in the safetensors files; "
                   "set teacher.scoring=prompt_logprobs")
