"""Transformers teacher backend: the reference implementation and the fallback when vLLM is absent.

Runs the decoder body once per batch, then the LM head chunk by chunk (`softlabels.topk_from_hidden`),
so no [tokens × vocab] tensor larger than one chunk ever exists. The head is the model's: its output
layer's weight and bias, then the soft cap / logit scale of its config (`softlabels.head_transform`). Sampling is a plain KV-cached loop
with a seeded `torch.Generator` per prompt, which makes it reproducible and lets the raw (T=1)
top-k be recorded at each step without keeping every step's logits.
"""

from __future__ import annotations

import numpy as np
import torch

from actors.backend import stop_list
from orchestrator.kd.softlabels import SoftLabels, head_transform, topk_from_hidden, topk_from_logits


class HFBackend:
    def __init__(self, model_path: str, *, dtype: str = "auto", device: str | None = None,
                 chunk_rows: int = 512, batch_tokens: int = 8192, max_length: int | None = None,
                 revision: str | None = None, tail_temperatures: tuple[float, ...] = ()):
        from transformers import AutoModelForCausalLM

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = {"auto": torch.float32 if self.device == "cpu" else torch.bfloat16,
                       "float32": torch.float32, "bfloat16": torch.bfloat16,
                       "float16": torch.float16}[dtype]
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch_dtype, revision=revision, local_files_only=True
        ).to(self.device).eval()
        cfg = self.model.config
        # the model's whole head: weight and bias of its output layer, then the soft cap and
        # logit scale its config sets (refused when it sets anything else)
        self.head_args = head_transform(cfg.to_dict(), fix="use teacher.backend=vllm with "
                                        "teacher.scoring=prompt_logprobs")
        self.tail_temperatures = tuple(tail_temperatures)
        self.head = self.model.get_output_embeddings()
        self.body = getattr(self.model, self.model.base_model_prefix)
        self.vocab_size = int(self.head.weight.shape[0])
        self.max_length = int(max_length or getattr(cfg, "max_position_embeddings", 2048))
        self.max_k = self.vocab_size
        self.chunk_rows = chunk_rows
        self.batch_tokens = batch_tokens

    @torch.inference_mode()
    def score(self, sequences: list[list[int]], *, k: int) -> list[SoftLabels]:
        out: list[SoftLabels | None] = [None] * len(sequences)
        for batch in _length_batches(sequences, self.batch_tokens):
            width = max(len(sequences[i]) for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                mask[row, : len(sequences[i])] = 1
            hidden = self.body(input_ids=ids.to(self.device),
                               attention_mask=mask.to(self.device)).last_hidden_state
            # every real position of the batch in one [N, H] block: one head pass, one host copy
            valid = mask.bool()
            targets = torch.full_like(ids, -1)
            targets[:, :-1] = torch.where(valid[:, 1:], ids[:, 1:], -1)
            top_ids, top_lps, tlp, tails = topk_from_hidden(
                hidden[valid.to(self.device)], self.head.weight, k=k,
                targets=targets[valid].to(self.device), chunk_rows=self.chunk_rows,
                bias=self.head.bias, tail_temperatures=self.tail_temperatures, **self.head_args)
            offset = 0
            for i in batch:
                seq, n = sequences[i], len(sequences[i])
                part = slice(offset, offset + n)
                out[i] = SoftLabels(np.asarray(seq, dtype=np.int32), 0, 0, top_ids[part].numpy(),
                                    top_lps[part].numpy(), tlp[part].numpy(), tails[part].numpy(),
                                    (1.0, *self.tail_temperatures))
                offset += n
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def sample(self, prompts: list[list[int]], *, k: int, n: int, temperature: float, top_p: float,
               max_new_tokens: int, seeds: list[int], eos_id: int | list[int] | None
               ) -> list[list[SoftLabels]]:
        """`eos_id`: the token, or tokens, that end a continuation (e.g. EOS and end-of-turn)."""
        return [self._sample_one(p, k=k, n=n, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens, seed=s, eos_id=eos_id)
                for p, s in zip(prompts, seeds)]

    def _sample_one(self, prompt: list[int], *, k, n, temperature, top_p, max_new_tokens, seed,
                    eos_id) -> list[SoftLabels]:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        ids = torch.tensor([prompt] * n, device=self.device)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        past, logits = out.past_key_values, out.logits[:, -1]
        tokens, top_ids, top_lps, tlps, tails = [], [], [], [], []
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        lengths = torch.full((n,), max_new_tokens, dtype=torch.long)
        stops = torch.tensor(stop_list(eos_id), dtype=torch.long, device=self.device)
        for step in range(max_new_tokens):
            nxt = _sample_next(logits.float(), temperature=temperature, top_p=top_p, generator=gen)
            c = topk_from_logits(logits, k=k, targets=nxt, tail_temperatures=self.tail_temperatures)
            tokens.append(nxt.cpu())
            top_ids.append(c.ids)
            top_lps.append(c.logprobs)
            tlps.append(c.target_logprobs)
            tails.append(c.tail_mass)
            if len(stops):
                stopped = torch.isin(nxt, stops)
                newly = stopped & ~done
                lengths[newly.cpu()] = step + 1
                done |= stopped
                if bool(done.all()):
                    break
            out = self.model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
        tok = torch.stack(tokens, 1).numpy()
        tid, tlp_k, tt, tm = (torch.stack(x, 1).numpy() for x in (top_ids, top_lps, tlps, tails))
        results = []
        for r in range(n):
            g = int(min(lengths[r], tok.shape[1]))
            seq = np.concatenate([np.asarray(prompt, dtype=np.int32), tok[r, :g].astype(np.int32)])
            results.append(SoftLabels(seq, len(prompt), len(prompt) - 1, tid[r, :g], tlp_k[r, :g],
                                      tt[r, :g], tm[r, :g], (1.0, *self.tail_temperatures)))
        return results

    def close(self) -> None:
        self.model = None


def _sample_next(logits: torch.Tensor, *, temperature: float, top_p: float,
                 generator: torch.Generator) -> torch.Tensor:
    """Sample one token per row from softmax(logits / T), restricted to the top-p nucleus."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _length_batches(sequences: list[list[int]], budget: int) -> list[list[int]]:
    """Indices grouped longest-first so that rows × longest row stays within `budget` tokens."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    batches, current, width = [], [], 0
    for i in order:
        w = max(width, len(sequences[i]))
        if current and w * (len(current) + 1) > budget:
            batches.append(current)
            current, w = [], len(sequences[i])
        current.append(i)
        width = w
    if current:
        batches.append(current)
    return batches
