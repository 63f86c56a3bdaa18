"""Sparse KD losses on *stored* labels (through a real shard write and read) against dense
divergences computed from the teacher's full fp32 logits, for every divergence × tail mode at
k < V and T ∈ {1, 2}.

The dense reference distribution of each mode, at temperature T (p_T = softmax(logits / T)):
- bucket: the teacher's top-k probabilities p_T[i] and one tail outcome 1 − Σ p_T[top-k], against
  the student's q_T over the same k + 1 outcomes;
- renormalize: the teacher's top-k renormalised (tail 0) against the student's full q_T (fKL, JSD,
  TVD; exact over the vocabulary), and for rKL both restricted to the top-k and renormalised.

Tolerance. Stored log-probs are ceil-rounded to 1/51 nat (ε): within a row each is lowered by
[0, ε), so after the softmax over the top-k at temperature T every teacher log p moves by < ε/T
(the tail is stored exactly). A divergence Σ f(p, q) then moves by at most
ε/T · (1 + max |log p − log q|) per row (fKL, JSD; TVD and rKL by ≤ ε/T), and × T² gives the
bound used: ε · T · (1 + M), M = max over the teacher's top-k of |log p_T − log q_T|.
"""

import math

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from orchestrator.shards import format as shards
from orchestrator.kd.losses import LOSS_KINDS, TAIL_MODES, divergence, distill_loss, tail_at
from orchestrator.shards.manifest import Manifest, save_manifest
from orchestrator.kd.softlabels import SoftLabels, topk_from_logits

V, K, N, BETA = 60, 8, 12, 0.3


def _divergence(kind, logp, logq):
    """Σ over outcomes, float64, 0·log 0 = 0."""
    p, q = logp.exp(), logq.exp()

    def kl(a, la, lb):
        return torch.where(a > 0, a * (la - lb), torch.zeros_like(a)).sum(-1)

    if kind == "fkl":
        return kl(p, logp, logq)
    if kind == "rkl":
        return kl(q, logq, logp)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    logm = torch.logaddexp(logp + math.log(BETA), logq + math.log(1 - BETA))
    return BETA * kl(p, logp, logm) + (1 - BETA) * kl(q, logq, logm)


def dense_reference(kind, tail, t_logits, s_logits, ids, T):
    """The divergence × T² between the teacher's (top-k + one tail bucket) distribution from its
    full fp32 logits and the student's, in float64."""
    lp = torch.log_softmax(t_logits.double() / T, -1)
    lq = torch.log_softmax(s_logits.double() / T, -1)
    p_top, q_top = lp.gather(1, ids), lq.gather(1, ids)
    if tail == "bucket":
        logp = torch.cat([p_top, torch.log1p(-p_top.exp().sum(-1, keepdim=True))], -1)
        logq = torch.cat([q_top, torch.log1p(-q_top.exp().sum(-1, keepdim=True))], -1)
        return _divergence(kind, logp, logq) * T * T
    p_ren = p_top - torch.logsumexp(p_top, -1, keepdim=True)
    if kind == "rkl":
        q_ren = q_top - torch.logsumexp(q_top, -1, keepdim=True)
        return _divergence(kind, p_ren, q_ren) * T * T
    full_p = torch.full_like(lq, -math.inf).scatter(1, ids, p_ren)  # 0 outside the top-k
    return _divergence(kind, full_p, lq) * T * T


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """Teacher logits, student logits, and the teacher's labels as a shard stores and returns
    them (dequantised log-probs, exact tail masses at T = 1 and 2)."""
    g = torch.Generator().manual_seed(7)
    t_logits = torch.randn(N, V, generator=g) * torch.linspace(0.5, 4, N).unsqueeze(1)
    s_logits = torch.randn(N, V, generator=g) * 1.5
    top = topk_from_logits(t_logits, k=K, tail_temperatures=(2.0,))
    sl = SoftLabels(np.arange(N, dtype=np.int32), 0, 0, top.ids.numpy(), top.logprobs.numpy(),
                    np.full(N, np.nan, dtype=np.float32), top.tail_mass.numpy(), (1.0, 2.0))
    root = str(tmp_path_factory.mktemp("dense"))
    fs = pafs.LocalFileSystem()
    fs.create_dir(f"{root}/shards", recursive=True)
    info = shards.write_shard(fs, f"{root}/shards", 0, [("a", sl)], {"k": K, "mode": "score"})
    m = Manifest(fingerprint="f", capture={}, total_units=1, total_records=1)
    m.shards[0] = info
    save_manifest(fs, root, m)
    (row,) = shards.read_shards(root)
    assert not np.array_equal(row["topk_logprobs"], sl.topk_logprobs)  # really quantised
    return (t_logits, s_logits, torch.from_numpy(row["topk_ids"]).long(),
            torch.from_numpy(row["topk_logprobs"]), torch.from_numpy(row["tail_mass"]),
            torch.from_numpy(row["tail_temperatures"]))


def tolerance(t_logits, s_logits, ids, T):
    lp = torch.log_softmax(t_logits.double() / T, -1).gather(1, ids)
    lq = torch.log_softmax(s_logits.double() / T, -1).gather(1, ids)
    M = (lp - lq).abs().max(-1).values
    return T * (1 + M) / shards.LOGPROB_SCALE


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("tail", TAIL_MODES)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_sparse_loss_on_stored_labels_equals_dense_divergence(stored, kind, tail, T):
    t_logits, s_logits, ids, lps, tails, temps = stored
    r = tail_at(tails, temps, T) if tail == "bucket" else None
    got = divergence(s_logits, ids, lps, kind=kind, temperature=T, beta=BETA, tail=tail,
                     teacher_tail=r).double()
    ref = dense_reference(kind, tail, t_logits, s_logits, ids, T)
    assert ((got - ref).abs() <= tolerance(t_logits, s_logits, ids, T)).all(), (got, ref)
    # the same through distill_loss, which picks the stored column itself
    mask = torch.ones(N, dtype=torch.bool)
    parts = distill_loss(s_logits, topk_ids=ids, topk_logprobs=lps, targets=torch.zeros(N).long(),
                         kd_mask=mask, kind=kind, temperature=T, beta=BETA, tail=tail, alpha=1.0,
                         tail_mass=tails, tail_temperatures=temps)
    torch.testing.assert_close(parts.kd.double(), got.mean())


def test_uniform_tail_guess_fails_where_the_stored_tail_holds(stored):
    """The old bucket mode tempered r_1 as if spread evenly over the V − k tail tokens; at T = 2
    that misses the dense divergence by far more than the tolerance, the stored r_2 does not."""
    t_logits, s_logits, ids, lps, tails, temps = stored
    T, n_tail = 2.0, V - K
    r1 = tails[:, 0].double()
    w = n_tail * (r1 / n_tail) ** (1 / T)                 # (V − k)·(r/(V − k))^(1/T)
    top_w = (lps.double() / T).exp().sum(-1)
    guess = w / (w + top_w)
    stored_r2 = tail_at(tails, temps, T)
    ref = dense_reference("fkl", "bucket", t_logits, s_logits, ids, T)
    old = divergence(s_logits, ids, lps, kind="fkl", temperature=T, tail="bucket",
                     teacher_tail=guess.float()).double()
    new = divergence(s_logits, ids, lps, kind="fkl", temperature=T, tail="bucket",
                     teacher_tail=stored_r2).double()
    assert ((new - ref).abs() <= tolerance(t_logits, s_logits, ids, T)).all()
    assert ((old - ref).abs() > tolerance(t_logits, s_logits, ids, T)).any()
    assert (guess - stored_r2.double()).abs().max() > 0.05


def test_bucket_at_an_uncaptured_temperature_is_refused(stored):
    from orchestrator.errors import ShardError

    _, s_logits, ids, lps, tails, temps = stored
    with pytest.raises(ShardError, match="teacher.tail_temperatures.*train.tail=renormalize"):
        distill_loss(s_logits, topk_ids=ids, topk_logprobs=lps, targets=torch.zeros(N).long(),
                     kd_mask=torch.ones(N, dtype=torch.bool), temperature=3.0, tail="bucket",
                     tail_mass=tails, tail_temperatures=temps)


def test_bucket_at_an_uncaptured_temperature_is_refused_before_training(tmp_path):
    """By the config check (before any work) and by the shard check (a capture made with
    other settings), each naming teacher.tail_temperatures and train.tail=renormalize."""
    from orchestrator.config import load_config
    from orchestrator.errors import ConfigError, ShardError
    from orchestrator.train.stream import check_shard_origin

    base = ["teacher.model=m", "data.path=d", f"output_dir={tmp_path}", "train.tail=bucket"]
    with pytest.raises(ConfigError, match="teacher.tail_temperatures.*train.tail=renormalize"):
        load_config(None, [*base, "train.temperature=2"])
    cfg = load_config(None, [*base, "train.temperature=2", "teacher.tail_temperatures=[2]"])
    assert cfg.teacher.tail_temperatures == [2.0]
    other = load_config(None, [*base, "teacher.tail_temperatures=[4]"])
    assert cfg.capture_fingerprint(format_version=3) != other.capture_fingerprint(format_version=3)
    with pytest.raises(ConfigError, match="vLLM's sampler"):
        load_config(None, [*base, "teacher.tail_temperatures=[2]", "teacher.mode=sample"])
    meta = {"tail_temperatures": [1.0]}
    check_shard_origin(meta, {"tail_temperature": 1.0}, name="s")
    with pytest.raises(ShardError, match="teacher.tail_temperatures.*train.tail=renormalize"):
        check_shard_origin(meta, {"tail_temperature": 2.0}, name="s")
