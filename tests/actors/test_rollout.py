"""Student rollout engines (actors/rollout.py): weights sent in place reach the samples, for each
backend and model family, and the Ray shell reloads them by itself after a restart.

Each engine starts from a model dir without weights (vLLM: dummy weights) and is sent the state
dict of a different model of the same config; its greedy continuations must then equal
transformers' `generate` of that model token for token. The sent models have every bias and norm
weight randomised, so that a parameter the engine drops changes the samples."""

import os
import signal

import pytest
import torch

from actors.rollout import RolloutActor, RolloutWorker
from orchestrator.errors import ConfigError, DataError, RaydistillError
from orchestrator.train.specs import RolloutEngineSpec

VOCAB, NEW, LENGTH = 256, 12, 256
FAMILIES = ["llama", "qwen2", "gemma2"]  # plain; attention biases; tied, soft-capped, 4 norms


def _model_dir(root, family: str) -> tuple[str, object]:
    """A dir with only the family's tiny config (no weights, no tokenizer needed for token ids)."""
    from orchestrator.driver import tiny

    cfg = tiny.family_config(family, VOCAB, layers=2, max_positions=LENGTH)
    out = root / family
    cfg.save_pretrained(out)
    return str(out), cfg


def _trained(cfg, seed: int):
    """A random model of `cfg` with a peaked head and random biases and norm weights (their init
    values — zeros, ones — would hide a dropped one)."""
    from orchestrator.driver import tiny

    model = tiny.build_model(cfg, seed=seed)
    if not cfg.tie_word_embeddings:  # a tied head scaled up also scales the input embedding
        tiny.sharpen(model, scale=3.0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def _prompts(*lengths: int) -> list[list[int]]:
    return [torch.randint(4, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist()
            for n in lengths]


# 140 tokens: longer than one KV block of vLLM on CPU (128), so a stale prefix cache would be hit
PROMPTS = _prompts(3, 17, 40, 140)
GREEDY = dict(max_new_tokens=NEW, temperature=0.0, seeds=[0, 1, 2, 3], stop_ids=[])


def _hf_greedy(model, prompts, n: int = NEW) -> list[list[int]]:
    outs = []
    for p in prompts:
        with torch.no_grad():
            o = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=n,
                               min_new_tokens=n, pad_token_id=0)
        outs.append(o[0, len(p):].tolist())
    return outs


def _check_refresh(worker: RolloutWorker, cfg) -> None:
    """Two loads in a row: each one's greedy samples are transformers' for those weights."""
    assert worker.version == -1
    for version, seed in [(1, 1), (2, 2)]:
        model = _trained(cfg, seed)
        seconds = worker.load_weights(version, model.state_dict())
        out = worker.generate(PROMPTS, **GREEDY)
        assert seconds > 0 and worker.version == version and out["version"] == version
        assert out["completions"] == _hf_greedy(model, PROMPTS), f"weights version {version}"
        if version == 1:
            first = out["completions"]
    assert out["completions"] != first  # the second load really replaced the first


def _check_partial_state_refused(worker: RolloutWorker, cfg) -> None:
    state = _trained(cfg, 3).state_dict()
    dropped = next(n for n in state if n.endswith("o_proj.weight"))
    del state[dropped]
    with pytest.raises(RaydistillError, match="whole model.state_dict"):
        worker.load_weights(5, state)
    assert worker.version == -1  # half-loaded weights are no version


def _check_sampling(worker: RolloutWorker) -> None:
    """Seeded: the same seeds give the same samples, other seeds others; stop ids end a sample
    (kept); a prompt may fill max_model_len with its continuation, not more."""
    sample = dict(max_new_tokens=NEW, temperature=1.5, stop_ids=[])
    a = worker.generate(PROMPTS, seeds=[7, 8, 9, 10], **sample)["completions"]
    assert worker.generate(PROMPTS, seeds=[7, 8, 9, 10], **sample)["completions"] == a
    assert worker.generate(PROMPTS, seeds=[1, 2, 3, 4], **sample)["completions"] != a
    full = worker.generate(PROMPTS, **GREEDY)["completions"]
    for i, seq in enumerate(full):
        stop = seq[4]
        got = worker.generate([PROMPTS[i]], **{**GREEDY, "seeds": [0], "stop_ids": [stop]})
        assert got["completions"][0] == seq[:seq.index(stop) + 1]
    limit = worker.ready()["max_length"]
    long = _prompts(limit - NEW)
    assert len(worker.generate(long, **{**GREEDY, "seeds": [0]})["completions"][0]) == NEW
    with pytest.raises(ConfigError, match="on_policy.max_new_tokens"):
        worker.generate(_prompts(limit - NEW + 1), **{**GREEDY, "seeds": [0]})
    with pytest.raises(DataError, match="vocabulary"):
        worker.generate([[1, VOCAB]], **{**GREEDY, "seeds": [0]})
    with pytest.raises(ConfigError, match="stop ids .999. are outside"):
        worker.generate(PROMPTS, **{**GREEDY, "stop_ids": [2, 999]})


# ---- transformers backend (fast) ----

@pytest.mark.parametrize("family", FAMILIES)
def test_hf_rollout_takes_sent_weights(tmp_path, family):
    model_dir, cfg = _model_dir(tmp_path, family)
    worker = RolloutWorker(RolloutEngineSpec(model_dir=model_dir, backend="hf",
                                             max_model_len=LENGTH))
    assert worker.ready()["backend"] == "hf" and worker.ready()["vocab_size"] == VOCAB
    _check_refresh(worker, cfg)
    _check_partial_state_refused(worker, cfg)


def test_hf_rollout_sampling_stops_and_lengths(tmp_path):
    model_dir, cfg = _model_dir(tmp_path, "llama")
    worker = RolloutWorker(RolloutEngineSpec(model_dir=model_dir, backend="hf",
                                             max_model_len=LENGTH))
    worker.load_weights(0, _trained(cfg, 1).state_dict())
    _check_sampling(worker)


def test_hf_rollout_starts_from_the_dirs_weights(tmp_path):
    """A model dir with weights: the engine samples with them until the first load."""
    model_dir, cfg = _model_dir(tmp_path, "llama")
    model = _trained(cfg, 4)
    model.save_pretrained(model_dir)
    worker = RolloutWorker(RolloutEngineSpec(model_dir=model_dir, backend="hf",
                                             max_model_len=LENGTH))
    out = worker.generate(PROMPTS, **GREEDY)
    assert out["version"] == -1 and out["completions"] == _hf_greedy(model, PROMPTS)


def test_engine_longer_than_the_model_refused(tmp_path):
    model_dir, _ = _model_dir(tmp_path, "llama")
    with pytest.raises(ConfigError, match="max_model_len .1024. is longer"):
        RolloutWorker(RolloutEngineSpec(model_dir=model_dir, backend="hf"))


# ---- vLLM backend: one engine per family ----

@pytest.fixture(scope="module", params=FAMILIES)
def vllm_engine(request, tmp_path_factory):
    model_dir, cfg = _model_dir(tmp_path_factory.mktemp("rollout"), request.param)
    worker = RolloutWorker(RolloutEngineSpec(model_dir=model_dir, backend="vllm",
                                             max_model_len=LENGTH, kv_cache_gib=0.05))
    yield worker, cfg
    worker.close()


@pytest.mark.slow
def test_vllm_rollout_takes_sent_weights(vllm_engine):
    worker, cfg = vllm_engine
    assert worker.ready()["backend"] == "vllm" and worker.ready()["vocab_size"] == VOCAB
    _check_refresh(worker, cfg)
    _check_partial_state_refused(worker, cfg)


@pytest.mark.slow
def test_vllm_rollout_sampling_stops_and_lengths(vllm_engine):
    worker, cfg = vllm_engine
    worker.load_weights(0, _trained(cfg, 1).state_dict())
    _check_sampling(worker)


# ---- the Ray shell ----

@pytest.mark.slow
def test_actor_reloads_weights_after_a_restart(tmp_path, ray_session):
    """A rollout actor killed between calls and during one: Ray restarts it, the call completes,
    and the fresh engine loads the weights the call names from their ObjectRef by itself."""
    import ray

    model_dir, cfg = _model_dir(tmp_path, "qwen2")
    actor = RolloutActor.options(num_cpus=0.5).remote(
        RolloutEngineSpec(model_dir=model_dir, backend="hf", max_model_len=LENGTH))
    try:
        pid = ray.get(actor.ready.remote())["pid"]
        model = _trained(cfg, 1)
        ref = ray.put(model.state_dict())
        call = dict(version=1, weights=[ref], **GREEDY)
        first = ray.get(actor.generate.remote(PROMPTS, **call))
        assert first["version"] == 1 and first["load_s"] > 0
        assert first["completions"] == _hf_greedy(model, PROMPTS)
        again = ray.get(actor.generate.remote(PROMPTS, **call))
        assert again["load_s"] == 0.0 and again["completions"] == first["completions"]

        os.kill(pid, signal.SIGKILL)  # between calls
        after = ray.get(actor.generate.remote(PROMPTS, **call), timeout=120)
        assert after["version"] == 1 and after["load_s"] > 0
        assert after["completions"] == first["completions"]
        assert ray.get(actor.ready.remote())["pid"] != pid

        running = actor.generate.remote(PROMPTS, **{**call, "max_new_tokens": 80})
        ray.kill(actor, no_restart=False)  # during the call (it takes seconds, the kill not)
        long = ray.get(running, timeout=120)
        assert long["version"] == 1 and long["load_s"] > 0
        assert [c[:NEW] for c in long["completions"]] == first["completions"]
    finally:
        ray.kill(actor, no_restart=True)


@pytest.mark.slow
def test_actor_errors_cross_ray_intact(tmp_path, ray_session):
    import ray

    model_dir, _ = _model_dir(tmp_path, "llama")
    actor = RolloutActor.options(num_cpus=0.5).remote(
        RolloutEngineSpec(model_dir=model_dir, backend="hf", max_model_len=LENGTH))
    try:
        with pytest.raises(RaydistillError, match="sends no weights"):
            ray.get(actor.generate.remote(PROMPTS, version=3, weights=None, **GREEDY))
        with pytest.raises(ConfigError, match="on_policy.max_new_tokens"):
            ray.get(actor.generate.remote(PROMPTS, version=-1, weights=None,
                                          **{**GREEDY, "max_new_tokens": LENGTH - 100}))
    finally:
        ray.kill(actor, no_restart=True)
    broken = RolloutActor.remote(RolloutEngineSpec(model_dir=model_dir, backend="hf"))
    try:
        with pytest.raises(ConfigError, match="max_model_len"):
            ray.get(broken.ready.remote())
    finally:
        ray.kill(broken, no_restart=True)
