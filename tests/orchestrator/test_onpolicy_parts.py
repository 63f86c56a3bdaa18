"""On-policy distillation's pieces without Ray: which prompt a stream row gives, how many samples
of a micro-batch are on-policy, the config's checks, and the teacher's scoring of student samples
(a real tiny teacher, compared with its own logits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.errors import ConfigError
from orchestrator.train.onpolicy import on_policy_count, prompt_of, rollout_seed


def _row(ids, *, prompt_len=0, mask=None):
    return {"sample_id": "s", "input_ids": np.asarray(ids, dtype=np.int32),
            "prompt_len": prompt_len,
            "loss_mask": np.ones(len(ids), bool) if mask is None else np.asarray(mask, bool)}


def test_prompts_are_the_data_prompts_or_the_text_prefix():
    text = _row(range(10, 30))
    chat = _row(range(10, 30), mask=[False] * 7 + [True] * 13)  # prompt part, then the answer
    sampled = _row(range(10, 30), prompt_len=5)  # a sample-mode row: prompt + teacher sample
    assert prompt_of(text, source="auto", prompt_tokens=4, room=100) == [10, 11, 12, 13]
    assert prompt_of(chat, source="auto", prompt_tokens=4, room=100) == list(range(10, 17))
    assert prompt_of(sampled, source="data", prompt_tokens=4, room=100) == list(range(10, 15))
    assert prompt_of(chat, source="prefix", prompt_tokens=4, room=100) == [10, 11, 12, 13]
    # a long prompt keeps its end: room = max_length − max_new_tokens
    assert prompt_of(chat, source="data", prompt_tokens=4, room=3) == [14, 15, 16]
    with pytest.raises(ConfigError, match="train.on_policy_prompts=data.*prefix"):
        prompt_of(text, source="data", prompt_tokens=4, room=100)


def test_on_policy_share_of_a_micro_batch():
    assert on_policy_count(0.0, 8) == 0
    assert on_policy_count(0.5, 8) == 4
    assert on_policy_count(0.01, 8) == 1  # a share > 0 is never rounded away
    assert on_policy_count(1.0, 8) == 8
    assert rollout_seed(0, 3, 1) == rollout_seed(0, 3, 1) != rollout_seed(0, 4, 1)


@pytest.mark.parametrize("sets, message", [
    (["train.on_policy=1.5"], "train.on_policy must be in \\[0, 1\\]"),
    (["on_policy.sync_every=4", "on_policy.max_staleness=1"],
     "sync_every 4 lets the rollout weights lag up to 3 steps.*max_staleness 1"),
    (["train.baselines=[offline]"], "train.on_policy is 0"),
    (["train.on_policy=0.1", "train.batch_size=2"], None),
    (["on_policy.loss=kl"], "on_policy.loss"),
    (["on_policy.temperature=-1"], "on_policy.temperature must be >= 0"),
])
def test_on_policy_config_checks(tmp_path, sets, message):
    from orchestrator.config import load_config

    base = ["teacher.model=t", "data.path=d.jsonl", f"output_dir={tmp_path}"]
    if message is None:
        load_config(None, base + sets)
        return
    with pytest.raises(ConfigError, match=message):
        load_config(None, base + sets)


def test_the_teacher_scores_student_samples_on_the_generated_tokens(tiny_teacher):
    """`TeacherWorker.score_rollouts` (hf backend): a row per prompt + completion, the teacher's
    top-k at every position equal to its own log-softmax, and the loss mask on exactly the
    generated tokens; the rollout's version and timings pass through; an empty completion is
    dropped."""
    from transformers import AutoModelForCausalLM

    from actors.teacher import TeacherWorker
    from orchestrator.shards.specs import EngineSpec

    spec = EngineSpec(backend="hf", model=tiny_teacher, revision=None, mode="score", max_k=8,
                      dtype="float32", scoring="hidden", memory_fraction=0.1, kv_cache_gib=None,
                      max_model_len=128, tensor_parallel_size=1, chunk_rows=64, batch_tokens=1024,
                      seed=0)
    worker = TeacherWorker(spec)
    prompts = [[5, 6, 7], [8, 9]]
    generated = {"completions": [[20, 21, 22, 23], []], "version": "kd@3", "generate_s": 0.5}
    out = worker.score_rollouts(prompts, generated, k=8, sample_ids=["a", "b"])
    assert out["version"] == "kd@3" and out["generate_s"] == 0.5 and out["score_s"] > 0
    assert [r["sample_id"] for r in out["rows"]] == ["a"]
    row = out["rows"][0]
    assert row["input_ids"].tolist() == [5, 6, 7, 20, 21, 22, 23]
    assert row["prompt_len"] == 3 and row["loss_mask"].tolist() == [False] * 3 + [True] * 4
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32)
    with torch.no_grad():
        lps = torch.log_softmax(model(torch.tensor([row["input_ids"]])).logits[0].float(), -1)
    top = lps.topk(8, dim=-1)
    assert np.array_equal(row["topk_ids"][:, 0], top.indices[:, 0].numpy())
    assert np.allclose(row["topk_logprobs"], top.values.numpy(), atol=2e-4)
    nxt = lps[torch.arange(6), torch.tensor(row["input_ids"][1:])].numpy()
    assert np.allclose(row["target_logprobs"][:-1], nxt, atol=2e-4)  # the sampled tokens' log-probs


def test_resuming_with_another_on_policy_share_is_refused():
    """λ takes its share of every micro-batch out of the offline stream: a checkpoint's data
    position holds only under the share it was saved with (a run from before on-policy samples
    existed was offline)."""
    from orchestrator.train.layout import batch_layout, refuse_changed_layout

    def layout(share):
        return batch_layout(batch_size=8, grad_accum=1, num_workers=1, seed=0, on_policy=share)

    refuse_changed_layout(layout(0.5), layout(0.5), what="run")
    refuse_changed_layout(batch_layout(batch_size=8, grad_accum=1, num_workers=1, seed=0),
                          layout(0.0), what="run")
    with pytest.raises(ConfigError, match="train.on_policy 0.0 → 0.5"):
        refuse_changed_layout(layout(0.0), layout(0.5), what="run")
    # an experiment's students differ in it (kd mixed, offline baseline): not checked there
    refuse_changed_layout(layout(0.5), batch_layout(batch_size=8, grad_accum=1, num_workers=1,
                                                    seed=0), what="experiment")


def test_a_failed_rollout_reaches_the_trainer_as_the_actors_own_message():
    """Ray nests a rollout's error inside the scoring task that waited for it, with headers and
    colour codes; the trainer raises one line: the step and the actor's message."""
    from orchestrator.errors import RaydistillError
    from orchestrator.train.onpolicy import _failed

    inner = RaydistillError("\x1b[36mray::_Rollout.generate()\x1b[39m (pid=1, ip=1.2.3.4)\n  At "
                            "least one of the input arguments could not be computed:\n"
                            "the weights sent to the rollout engine do not fit its architecture")
    error = _failed(inner, 7)
    assert str(error) == ("the on-policy samples of step 7 failed: the weights sent to the "
                          "rollout engine do not fit its architecture")
