"""The two engines behind `actors.rollout.RolloutWorker`: a real vLLM engine of the student
(`VLLMRolloutEngine`) and a transformers fallback (`HFRolloutEngine`). Both take a full HF-named
state dict in place and sample one continuation per prompt, seeded per prompt, stopping only at
the caller's stop ids (the model's own EOS is not a stop unless listed).

vLLM weight refresh: the engine core runs in its own process (vLLM's default; on CPU its OpenMP
setup needs the multiprocess executor, and an in-process engine core freezes vLLM's environment
cache for the whole process), with the model in a worker process of its own. The state dict goes
to that worker as one safetensors file in shared memory (/dev/shm when it has room, else the temp
folder): `collective_rpc` carries only its path — vLLM's RPC messages decode tensors in
arguments as plain lists, and pickling them would copy them twice — and the worker memory-maps it.
There `WeightReload` (mixed into vLLM's worker by `worker_extension_cls`) runs vLLM's own
in-place reload (`vllm.model_executor.model_loader.reload`): layers are put back in checkpoint
layout, the model class's `load_weights` maps HF names onto vLLM's fused parameters (q/k/v →
qkv_proj, gate/up → gate_up_proj), and each layer's `process_weights_after_loading` runs again.
A plain `param.copy_` would not do: on CPU vLLM repacks every linear weight into a oneDNN /
sgl-kernel handle after loading, so copied parameters would never reach the matmuls. The prefix
cache is reset afterwards (its KV blocks were computed with the old weights).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from orchestrator.errors import RaydistillError
from orchestrator.train.specs import RolloutEngineSpec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt")


def engine_dtype(spec: RolloutEngineSpec) -> str:
    """The spec's dtype with "auto" resolved: bfloat16 on GPU, float32 on CPU."""
    if spec.dtype != "auto":
        return spec.dtype
    return "bfloat16" if torch.cuda.is_available() else "float32"


def has_weights(model_dir: str) -> bool:
    return any(any(Path(model_dir).glob(p)) for p in _WEIGHT_FILES)


class WeightReload:
    """Mixed into vLLM's worker class by `worker_extension_cls`; called by name through
    `collective_rpc`, so only a file path crosses the engine's RPC."""

    def raydistill_reload_weights(self, path: str) -> list[str]:
        """Load the HF-named tensors of the safetensors file `path` into the running model in
        place (vLLM's layerwise reload: the same path as `Worker.reload_weights`, repeated here
        to get the loaded names back). Returns the model parameters nothing was loaded into
        (empty: all replaced)."""
        from safetensors import safe_open
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import (finalize_layerwise_reload,
                                                             initialize_layerwise_reload)

        model = self.get_model()
        wanted = {name for name, _ in model.named_parameters()}
        with (safe_open(path, framework="pt") as fh, set_current_vllm_config(self.vllm_config),
              torch.no_grad()):
            initialize_layerwise_reload(model)
            loaded = model.load_weights((name, fh.get_tensor(name)) for name in fh.keys())
            finalize_layerwise_reload(model, self.vllm_config.model_config)
        return sorted(wanted - set(loaded or ()))


class VLLMRolloutEngine:
    def __init__(self, spec: RolloutEngineSpec):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        self.dtype = engine_dtype(spec)
        args = dict(model=spec.model_dir, runner="generate", dtype=self.dtype, seed=spec.seed,
                    max_model_len=spec.max_model_len, enforce_eager=not on_gpu,
                    gpu_memory_utilization=spec.memory_fraction, skip_tokenizer_init=True,
                    worker_extension_cls="actors.rollout_engines.WeightReload")
        if not has_weights(spec.model_dir):
            args["load_format"] = "dummy"  # random weights until the trainers send theirs
        if spec.kv_cache_gib is not None:
            args["kv_cache_memory_bytes"] = int(spec.kv_cache_gib * (1 << 30))
        self.llm = LLM(**args)
        model_config = self.llm.llm_engine.model_config
        self.vocab_size = int(model_config.get_vocab_size())
        self.max_length = int(model_config.max_model_len)
        self.model_dir = spec.model_dir
        self.tied = bool(getattr(model_config.hf_text_config, "tie_word_embeddings", False))

    def load(self, state: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        dtype = _DTYPES[self.dtype]
        tensors, seen = {}, set()
        for name, t in state.items():
            if self.tied and name == "lm_head.weight":  # the embedding (some vLLM models refuse it)
                continue
            t = t.detach().to("cpu", dtype).contiguous()
            if t.data_ptr() in seen:  # a tied weight: safetensors stores no shared memory
                t = t.clone()
            seen.add(t.data_ptr())
            tensors[name] = t
        folder = _exchange_folder(sum(t.nbytes for t in tensors.values()))
        with tempfile.NamedTemporaryFile(dir=folder, prefix="raydistill-weights-",
                                         suffix=".safetensors") as fh:
            save_file(tensors, fh.name)
            del tensors
            try:
                answers = self.llm.collective_rpc("raydistill_reload_weights", args=(fh.name,))
            finally:  # its KV blocks hold the old weights' keys and values, even after a failure
                self.llm.reset_prefix_cache()
        missing = sorted({n for a in answers if a for n in a})
        if missing:
            raise RaydistillError(
                f"the weights sent to the rollout engine of {self.model_dir} left "
                f"{len(missing)} of its parameters unloaded ({', '.join(missing[:5])}…): the "
                "state dict is not a full one of this architecture; send the student's whole "
                "model.state_dict()")

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                 seeds: list[int], stop_ids: list[int]) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(temperature=temperature, top_p=1.0, top_k=0, seed=s,
                                 max_tokens=max_new_tokens, stop_token_ids=list(stop_ids),
                                 ignore_eos=True, detokenize=False) for s in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
                                 params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outs]

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm


def _exchange_folder(nbytes: int) -> str:
    """Where the weights file for the engine's worker goes: shared memory when it has room for
    it twice over (a file there is RAM, not disk), else the temp folder."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and shutil.disk_usage(shm).free > 2 * nbytes:
        return shm
    return tempfile.gettempdir()


class HFRolloutEngine:
    """transformers, one prompt at a time with a KV cache; sampling draws from a torch.Generator
    seeded by the prompt's seed, so results do not depend on batching or on other callers."""

    def __init__(self, spec: RolloutEngineSpec):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = _DTYPES[engine_dtype(spec)]
        config = AutoConfig.from_pretrained(spec.model_dir)
        torch.manual_seed(spec.seed)
        if has_weights(spec.model_dir):
            model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
        self.vocab_size = int(config.get_text_config().vocab_size)
        self.max_length = spec.max_model_len
        self.model_dir = spec.model_dir

    def load(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if self.tied:  # the head is the input embedding: its own entry may be absent
            missing = [n for n in missing if n != "lm_head.weight"]
        if missing or unexpected:
            raise RaydistillError(
                f"the weights sent to the rollout engine of {self.model_dir} do not fit its "
                f"architecture: missing {missing[:5]}, unexpected {unexpected[:5]}; send the "
                "student's whole model.state_dict()")

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                 seeds: list[int], stop_ids: list[int]) -> list[list[int]]:
        stops = set(stop_ids)
        completions = []
        for prompt, seed in zip(prompts, seeds):
            gen = torch.Generator(self.device).manual_seed(seed)
            ids = torch.tensor([prompt], device=self.device)
            past, out = None, []
            for _ in range(max_new_tokens):
                res = self.model(input_ids=ids, past_key_values=past, use_cache=True)
                past, logits = res.past_key_values, res.logits[0, -1].float()
                if temperature > 0:
                    probs = torch.softmax(logits / temperature, -1)
                    token = int(torch.multinomial(probs, 1, generator=gen))
                else:
                    token = int(logits.argmax())
                out.append(token)
                if token in stops:
                    break
                ids = torch.tensor([[token]], device=self.device)
            completions.append(out)
        return completions

    def close(self) -> None:
        self.model = None
