"""Students on Ray Train: local mode and real DDP workers, the report and its plots, students that
load in transformers, resume after a killed worker or an interrupted driver, and every bad input
refused before training starts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import (capture_folder, interrupt_train_then_resume, train_config,
                            write_jsonl)
from orchestrator.driver.cli import main
from orchestrator.errors import RaydistillError

PNG = b"\x89PNG\r\n\x1a\n"


def _report(path: str) -> dict:
    return json.loads((Path(path).parent / "report.json").read_text())


def test_local_mode_trains_kd_and_baselines_with_report_and_loadable_students(captured):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.driver import pipeline

    cfg = train_config(captured["out"], captured["model"], captured["data"],
                       **{"train.num_workers": 0})
    path = pipeline.train(cfg)
    report = _report(path)
    assert set(report["students"]) == {"kd", "hard", "bc"}
    for label, row in report["students"].items():
        assert row["steps"] == 12
        assert 0 < row["student_nll"] < 10 and 0 <= row["top1"] <= 1 and row["kl"] > 0, label
        assert row["teacher_nll"] == pytest.approx(report["students"]["kd"]["teacher_nll"])
    assert [h["step"] for h in report["history"]["kd"]] == [3, 6, 9, 12]
    # the students' LM head ran fused with the loss in row chunks (kd/step.py)
    assert {h["fused_head"] for label in report["history"] for h in report["history"][label]} \
        == {1.0}
    assert "gap_recovered" in report["students"]["kd"]
    exp = Path(path).parent
    for plot in ("loss.png", "metrics.png"):
        assert (exp / "plots" / plot).read_bytes()[:8] == PNG
    md = Path(path).read_text()
    assert "| KD (soft labels) |" in md and "| hard labels |" in md and "behaviour cloning" in md
    # greedy completions side by side: the teacher's are its own greedy continuation (cached in
    # the held-out capture), each student has its own; tokens/s per student
    rows = report["completions"]
    assert len(rows) == 3 and all(set(r) == {"prompt", "teacher", "kd", "hard", "bc"}
                                  for r in rows)
    from orchestrator.driver.completions import prompts_of

    prompt = prompts_of(str(capture_folder(captured["out"], "heldout")), count=1,
                        prompt_tokens=8)[0]  # the config's train.bc_prompt_tokens
    teacher_tok = AutoTokenizer.from_pretrained(captured["model"])
    teacher = AutoModelForCausalLM.from_pretrained(captured["model"])
    want = teacher.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=48,
                            pad_token_id=teacher_tok.pad_token_id)[0, len(prompt):]
    assert rows[0]["teacher"] == teacher_tok.decode(want)
    assert rows[0]["prompt"] == teacher_tok.decode(prompt)
    assert len(list(capture_folder(captured["out"], "heldout").glob("greedy-*.json"))) == 1
    assert "## Greedy completions" in md and "| teacher |" in md
    assert all(row["tokens_per_s"] > 0 for row in report["students"].values())
    # the students are plain Hugging Face directories
    model_dir = report["students"]["kd"]["model_dir"]
    assert not (Path(model_dir) / "train_state.pt").exists()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok("def main():", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_two_ddp_workers(captured, packing):
    import torch

    from orchestrator.driver import pipeline

    packed = {"train.packing": "true", "train.max_tokens_per_batch": 256} if packing else {}
    cfg = train_config(captured["out"], captured["model"], captured["data"],
                       **{"train.num_workers": 2, "train.baselines": "[]", **packed})
    path = pipeline.train(cfg)
    report = _report(path)
    kd = report["history"]["kd"]
    assert kd[-1]["step"] == 12 and kd[-1]["workers"] == 2 and kd[-1]["fused_head"] == 1.0
    assert kd[-1]["threads"] == 1  # two workers packed on the session's 2 CPUs: a core each
    # each worker's own data position is in the checkpoint (packed: the samples it consumed)
    last = max((Path(path).parent / "kd").glob("checkpoint_*/train_state.pt"),
               key=lambda p: torch.load(p, weights_only=True)["step"])
    positions = torch.load(last, weights_only=True)["positions"]
    assert len(positions) == 2 and (packing or positions == [12 * 4] * 2)
    assert report["students"]["kd"]["student_nll"] < 10
    # the last evaluation's per-sequence sums, gathered from both workers' held-out slices
    from orchestrator.kd.evaluate import SEQUENCES_KEY
    from orchestrator.train.launch import load_done

    sequences = load_done(str(Path(path).parent / "kd"))["final"][SEQUENCES_KEY]
    assert len(sequences) == report["settings"]["captures"]["held-out"]["rows"] > 1
    assert sum(n for n, _ in sequences.values()) == report["students"]["kd"]["positions"]


@pytest.mark.timeout(180, method="thread")  # ray.get ignores SIGALRM
def test_fewer_heldout_samples_than_workers_does_not_hang(captured, tmp_path):
    """Rank 1 holds no held-out sample but enters the evaluation's all-reduce with zeros (it used
    to skip it, and rank 0 waited there for ever)."""
    from orchestrator.train.stream import ShardWatcher, heldout_samples
    from orchestrator.train.launch import fit_student

    spec = _spec(captured, optim=dict(max_steps=4, warmup_steps=1),
                 eval=dict(samples=1, every=2), run=dict(log_every=2))
    [only] = heldout_samples(ShardWatcher(spec.eval.heldout_uri, wait=False), rank=0, world=1,
                             limit=1)
    assert heldout_samples(ShardWatcher(spec.eval.heldout_uri, wait=False), rank=1, world=2,
                           limit=1) == []
    result = fit_student(spec, storage=str(tmp_path), name="one-heldout", num_workers=2,
                         use_gpu=False, cpus_per_worker=0.5, max_failures=0)
    assert [h["step"] for h in result.history] == [2, 4]
    assert result.final["workers"] == 2
    assert result.final["eval_positions"] == len(only["input_ids"]) - 1  # the one sample's
    assert 0 < result.final["eval_student_nll"] < 10


def _spec(captured, *, optim: dict | None = None, eval: dict | None = None,
          run: dict | None = None, data: dict | None = None):
    """A KD student run on the shared capture; `optim`, `eval`, `run`, `data`: fields to
    change."""
    from orchestrator.kd.losses import LossSpec
    from orchestrator.storage import filesystem
    from orchestrator.shards.manifest import load_manifest
    from orchestrator.shapes import resolve_shape
    from orchestrator.teacher_info import inspect_teacher
    from orchestrator.train.specs import (DataSpec, EvalSpec, OptimSpec, RunSpec, StudentSpec,
                                          TrainSpec)

    shards, heldout = (str(capture_folder(captured["out"], kind)) for kind in ("main", "heldout"))
    m = load_manifest(*filesystem(shards))
    info = inspect_teacher(captured["model"])
    return TrainSpec(
        student=StudentSpec(teacher_model=captured["model"], shape=resolve_shape(preset="nano"),
                            init_from_teacher=False),
        data=DataSpec(**{"shards_uri": shards, "units": list(range(m.total_units)),
                         "streaming": False,
                         "expect": {"tokenizer_fingerprint": info.tokenizer_fingerprint},
                         **(data or {})}),
        loss=LossSpec(kind="fkl", temperature=2.0, alpha=0.5, beta=0.5, tail="renormalize"),
        optim=OptimSpec(**{"lr": 2e-3, "warmup_steps": 5, "batch_size": 4, "grad_accum": 2,
                           "max_steps": 60, "seed": 7, **(optim or {})}),
        eval=EvalSpec(**{"every": 10, "heldout_uri": heldout,
                         "samples": 16, **(eval or {})}),
        run=RunSpec(**{"log_every": 5, **(run or {})}))


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_killed_worker_resumes_from_checkpoint_and_matches_an_uninterrupted_run(captured,
                                                                                 tmp_path,
                                                                                 packing):
    """Packed, each micro-batch holds as many samples as fit 3 rows of 128 tokens: the
    checkpoint's data position is the samples consumed, not step × batch_size."""
    import ray

    from orchestrator.train.board import ShardBoard
    from orchestrator.train.launch import fit_student

    board = ray.remote(ShardBoard).options(num_cpus=0).remote(max_ahead=1)
    killed = []

    def killer():
        while not killed:
            m = ray.get(board.snapshot.remote())["metrics"].get("kd")
            if m and m["step"] >= 13:  # checkpoints at 5 and 10 are persisted
                os.kill(m["pid"], signal.SIGKILL)
                killed.append(m["step"])
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    kw = dict(num_workers=1, use_gpu=False, cpus_per_worker=0.5)
    optim = dict(max_steps=20, packing=packing, max_tokens_per_batch=384 if packing else 0)
    data = dict(max_length=128)  # the capture's
    hit = fit_student(_spec(captured, optim=optim, eval=dict(every=5), run=dict(board=board),
                            data=data),
                      storage=str(tmp_path), name="hit", max_failures=2, **kw)
    killed.append(-1)  # stop the killer if the run ended first
    assert killed[0] > 0, "the worker was never killed"
    steps = [h["step"] for h in hit.history]
    assert steps == sorted(set(steps)) and steps[-1] == 20  # no step lost or repeated
    # the last checkpoint Ray Train had registered before the kill
    assert hit.final["resumed_from"] in (5, 10, 15) and hit.final["resumed_from"] < killed[0]
    clean = fit_student(_spec(captured, optim=optim, eval=dict(every=5), data=data),
                        storage=str(tmp_path),
                        name="clean", max_failures=0, **kw)
    # same seed, exact data position and optimizer state: the same student
    assert hit.final["eval_student_nll"] == pytest.approx(clean.final["eval_student_nll"], abs=1e-4)
    assert hit.final["eval_kl"] == pytest.approx(clean.final["eval_kl"], abs=1e-4)


@pytest.mark.timeout(600, method="thread")
def test_fsdp_trains_like_ddp_exports_whole_weights_and_resumes_exactly(captured, tmp_path):
    """train.strategy=fsdp on two workers (FSDP2 over gloo on the CPU here): the same student as
    DDP's from the same seed and data (shards gathered into a plain Hugging Face checkpoint), and
    a worker killed after a checkpoint resumes from it to the uninterrupted run's student."""
    import ray
    from transformers import AutoModelForCausalLM

    from orchestrator.train.board import ShardBoard
    from orchestrator.train.launch import fit_student

    kw = dict(num_workers=2, use_gpu=False, cpus_per_worker=0.5)
    short = dict(max_steps=10, batch_size=2)

    def fit(name, strategy, *, board=None, failures=0):
        run = {"strategy": strategy, "torch_threads": 1, "log_every": 1} | (
            {"board": board} if board else {})
        return fit_student(_spec(captured, optim=short, eval={"every": 5}, run=run),
                           storage=str(tmp_path), name=name, max_failures=failures, **kw)

    fsdp, ddp = fit("fsdp", "fsdp"), fit("ddp", "ddp")
    assert fsdp.final["workers"] == 2 and fsdp.final["fused_head"] == 1.0
    for key in ("eval_student_nll", "eval_kl", "eval_top1"):
        assert fsdp.final[key] == pytest.approx(ddp.final[key], abs=2e-3), key
    a = AutoModelForCausalLM.from_pretrained(fsdp.model_dir)
    b = AutoModelForCausalLM.from_pretrained(ddp.model_dir)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert max((a.state_dict()[k] - v).abs().max().item() for k, v in b.state_dict().items()) < 1e-3

    board = ray.remote(ShardBoard).options(num_cpus=0).remote(max_ahead=1)
    killed = []

    def killer():
        while not killed:
            m = ray.get(board.snapshot.remote())["metrics"].get("kd")
            if m and m["step"] >= 7:  # the checkpoint at 5 is persisted; 3 steps to go
                os.kill(m["pid"], signal.SIGKILL)
                killed.append(m["step"])
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    hit = fit("fsdp-hit", "fsdp", board=board, failures=2)
    killed.append(-1)
    assert killed[0] > 0, "the worker was never killed"
    # the last checkpoint Ray Train had registered before the kill
    assert hit.final.get("resumed_from") == 5, (killed, hit.final)
    assert hit.final["resumed_from"] < killed[0]
    assert hit.final["eval_student_nll"] == pytest.approx(fsdp.final["eval_student_nll"], abs=1e-4)
    assert hit.final["eval_kl"] == pytest.approx(fsdp.final["eval_kl"], abs=1e-4)


def test_a_killed_worker_with_no_retries_left_advises_resume(captured, tmp_path):
    """A lost worker is transient: with max_failures 0 the run fails, and the one message says the
    checkpoints are kept and to rerun with --resume (a deterministic error never says so:
    tests/orchestrator/test_errors.py)."""
    import ray

    from orchestrator.train.board import ShardBoard
    from orchestrator.errors import RaydistillError
    from orchestrator.train.launch import fit_student

    board = ray.remote(ShardBoard).options(num_cpus=0).remote(max_ahead=1)
    killed = []

    def killer():
        while not killed:
            m = ray.get(board.snapshot.remote())["metrics"].get("kd")
            if m and m["step"] >= 5:
                os.kill(m["pid"], signal.SIGKILL)
                killed.append(m["step"])
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        with pytest.raises(RaydistillError) as info:
            fit_student(_spec(captured, optim=dict(max_steps=40), run=dict(board=board)),
                        storage=str(tmp_path), name="kd", num_workers=1, use_gpu=False,
                        cpus_per_worker=0.5, max_failures=0)
    finally:
        killed.append(-1)
    assert killed[0] > 0, "the worker was never killed"
    text = str(info.value)
    assert text.startswith("training of the kd student failed: ")
    assert f"Checkpoints are kept under {tmp_path}/kd; rerun with --resume" in text
    assert "\n" not in text and "Traceback" not in text


def test_interrupted_driver_resumes_the_experiment(captured, ray_session, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({
        "teacher": {"model": captured["model"], "backend": "hf", "k": 8, "num_cpus": 0.5,
                    "max_new_tokens": 16},
        "data": {"path": captured["data"], "max_length": 128, "eval_fraction": 0.1},
        "capture": {"samples_per_shard": 8},
        "train": {"max_steps": 40, "eval_every": 10, "log_every": 10, "batch_size": 4,
                  "baselines": [], "eval_samples": 16, "bc_prompt_tokens": 8},
        "output_dir": captured["out"]}))
    exp = interrupt_train_then_resume(["train", str(cfg)],
                                      ray_address=ray_session.address_info["address"],
                                      output_dir=captured["out"])
    final = json.loads((Path(captured["out"]) / "experiments" / exp / "report.json").read_text())
    kd = final["history"]["kd"]
    assert kd[-1]["step"] == 40 and kd[-1]["resumed_from"] >= 10
    steps = [h["step"] for h in kd]
    assert steps == sorted(set(steps))


@pytest.fixture
def copied_capture(captured, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(captured["out"], out, ignore=shutil.ignore_patterns("experiments"))
    return out


def _train_cli(captured, out, *sets, resume: str | None = None, command: str = "train"):
    base = ["--set", f"teacher.model={captured['model']}", "--set", f"data.path={captured['data']}",
            "--set", f"output_dir={out}"]
    cfg = train_config(out, captured["model"], captured["data"])
    path = Path(out).parent / "c.yaml"
    from dataclasses import asdict

    path.write_text(json.dumps({k: asdict(getattr(cfg, k)) for k in
                                ("teacher", "data", "capture", "student", "train")}))
    return main([command, str(path), *base, *[x for s in sets for x in ("--set", s)],
                 *(["--resume", resume] if resume else [])])


def test_resume_with_another_batch_layout_is_refused(captured, copied_capture, capsys):
    """A checkpoint at step s has consumed s · batch_size · grad_accum samples of each worker's
    stream: resuming with another batch size, accumulation or worker count would silently train
    on other samples. The driver refuses before any work; the worker refuses a checkpoint of
    another layout however it was reached."""
    from orchestrator.train.launch import fit_student

    short = ("train.max_steps=3", "train.eval_every=3", "train.log_every=3", "train.baselines=[]")
    assert _train_cli(captured, copied_capture, *short) == 0
    [exp] = os.listdir(copied_capture / "experiments")
    run = copied_capture / "experiments" / exp / "kd"
    (run / "done.json").unlink()  # as if interrupted after its last checkpoint (step 3)
    capsys.readouterr()
    for change, named in [("train.batch_size=2", "train.batch_size 4 → 2"),
                          ("train.grad_accum=2", "train.grad_accum 1 → 2"),
                          ("train.num_workers=2", "train.num_workers 1 → 2")]:
        assert _train_cli(captured, copied_capture, *short, change, resume=exp) == 2, change
        err = capsys.readouterr().err
        assert named in err and f"experiment {exp}" in err and "omit --resume" in err, err
    assert not (run / "done.json").exists()  # nothing trained
    # the same layout resumes from the checkpoint
    assert _train_cli(captured, copied_capture, *short[1:], "train.max_steps=6",
                      resume=exp) == 0
    kd = _report(str(copied_capture / "experiments" / exp / "report.md"))["history"]["kd"]
    assert [h["step"] for h in kd] == [3, 6] and kd[-1]["resumed_from"] == 3
    # without the driver's record, the worker refuses the checkpoint itself
    (run / "done.json").unlink()
    (run / "layout.json").unlink()
    spec = _spec(captured, optim=dict(batch_size=2, max_steps=9), eval=dict(every=3),
                 run=dict(log_every=3))
    with pytest.raises(RaydistillError, match="train.batch_size 4 → 2"):
        fit_student(spec, storage=str(run.parent), name="kd", num_workers=1, use_gpu=False,
                    cpus_per_worker=0.5, max_failures=0)


def test_packed_bf16_checkpointed_run_goes_through_the_pipeline_and_keeps_its_layout(
        captured, copied_capture, capsys):
    """train.packing, max_tokens_per_batch, precision and gradient_checkpointing reach the
    worker: the checkpoint's data position is the samples its packed micro-batches held (not
    step × batch_size), the metrics carry the padding share packing removed, and a resume that
    turns packing off is refused like any other change of batch layout."""
    import torch

    short = ("train.max_steps=4", "train.eval_every=4", "train.log_every=2", "train.baselines=[]")
    packed = ("train.packing=true", "train.max_tokens_per_batch=384", "train.precision=bf16",
              "train.gradient_checkpointing=true")
    assert _train_cli(captured, copied_capture, *short, *packed) == 0
    [exp] = os.listdir(copied_capture / "experiments")
    kd = _report(str(copied_capture / "experiments" / exp / "report.md"))["history"]["kd"]
    assert [h["step"] for h in kd] == [2, 4]
    assert all(0 < h["padding_share"] < 1 and h["tokens_per_s"] > 0 for h in kd)
    [state] = (copied_capture / "experiments" / exp / "kd").glob("*/train_state.pt")
    state = torch.load(state, weights_only=True)
    assert state["layout"]["train.packing"] and state["layout"]["train.max_tokens_per_batch"] == 384
    assert state["positions"] == [state["position"]] and state["position"] != 4 * 4
    (copied_capture / "experiments" / exp / "kd" / "done.json").unlink()
    capsys.readouterr()
    assert _train_cli(captured, copied_capture, *short, resume=exp) == 2
    assert "train.packing True → False" in capsys.readouterr().err


def test_two_datasets_in_one_output_dir_both_capture_and_train(captured, copied_capture, texts,
                                                               tmp_path, capsys):
    """Own data with only data.path changed, in an output_dir that holds another config's
    captures: `run` captures it into folders of its own and trains, no --fresh; the first config
    then still trains on its own captures, which stayed as they were. Each report names its own
    capture folders."""
    from orchestrator.shards.dirs import list_captures

    own = write_jsonl(tmp_path / "own.jsonl",
                      [{"id": i, "text": t} for i, t in enumerate(texts[40:80])])
    first = {p: p.stat().st_mtime_ns for p in copied_capture.rglob("*") if p.is_file()}
    short = ("train.max_steps=3", "train.eval_every=3", "train.log_every=3",
             "train.baselines=[]", "train.num_workers=0")
    assert _train_cli(captured, copied_capture, *short, f"data.path={own}", command="run") == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"{copied_capture} also holds 3 other capture(s) (" in err
    assert _train_cli(captured, copied_capture, *short) == 0
    assert {p: p.stat().st_mtime_ns for p in first} == first
    assert len(list_captures(str(copied_capture))) == 5  # 3 of the first config, 2 of own data
    reports = [json.loads(p.read_text())["settings"]["captures"]
               for p in sorted((copied_capture / "experiments").glob("*/report.json"))]
    dirs = [{label: c["dir"] for label, c in r.items()} for r in reports]
    assert len(dirs) == 2 and dirs[0]["capture"] != dirs[1]["capture"]
    for d in dirs:
        assert {Path(v).parent for v in d.values()} == {copied_capture / "captures"}
        assert Path(d["capture"]).name.startswith("main-")
        assert Path(d["held-out"]).name.startswith("heldout-")
    assert sum(r["capture"]["rows"] for r in reports) > reports[0]["capture"]["rows"]


def test_corrupt_shard_is_named_and_nothing_trains(captured, copied_capture, capsys):
    shard = sorted((capture_folder(copied_capture) / "shards").glob("*.parquet"))[2]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert _train_cli(captured, copied_capture) == 2
    err = capsys.readouterr().err
    assert shard.name in err and "checksum" in err and "--repair" in err
    assert not (copied_capture / "experiments").exists()


def test_shards_of_another_tokenizer_are_refused(captured, tmp_path, ray_session, capsys):
    from orchestrator.driver import tiny
    from orchestrator.driver.pipeline import capture

    teacher = tmp_path / "teacher"
    shutil.copytree(captured["model"], teacher)
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "text": "x = 1\n" * (i + 3)}
                                              for i in range(20)])
    out = tmp_path / "out"
    capture(train_config(out, str(teacher), data, **{"train.baselines": "[]"}))
    # the teacher directory's tokenizer is replaced after the capture (same path, same vocab size)
    texts = list(tiny.chunks_of_text(tiny.stdlib_sources()[100:130]))
    tiny.train_tokenizer(texts, teacher, vocab_size=1024)
    code = main(["train", "--set", f"teacher.model={teacher}", "--set", f"data.path={data}",
                 "--set", f"output_dir={out}", "--set", "train.baselines=[]",
                 *sum((["--set", f"{k}={v}"] for k, v in {
                     "teacher.backend": "hf", "teacher.k": 8, "capture.samples_per_shard": 8,
                     "data.max_length": 128, "data.eval_fraction": 0.1,
                     "train.eval_samples": 16}.items()), []),
                 str(_empty_config(tmp_path))])
    assert code == 2
    assert "another tokenizer" in capsys.readouterr().err


def _empty_config(tmp_path) -> Path:
    p = tmp_path / "empty.yaml"
    p.write_text("{}\n")
    return p


@pytest.mark.parametrize("override, message", [
    ("student.heads=3", "must divide student.hidden"),
    ("train.loss=kl", "fkl | rkl | jsd | tvd"),
    ("train.baselines=[hard, teacher]", "valid baselines: hard, bc"),
    ("student.preset=huge", "student.preset must be one of nano"),
])
def test_bad_training_settings_fail_before_any_work(captured, tmp_path, override, message,
                                                    capsys):
    assert _train_cli(captured, tmp_path / "out", override) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_student_larger_than_the_teacher_is_warned_about(captured, capsys):
    from orchestrator.driver.preflight import warn_if_not_smaller
    from orchestrator.shapes import resolve_shape

    warn_if_not_smaller(captured["model"], resolve_shape(preset="small"))
    assert "the student (4×512) is about" in capsys.readouterr().err
    warn_if_not_smaller(captured["model"], resolve_shape(preset="nano"))
    assert "warning" not in capsys.readouterr().err


def test_train_refuses_an_incomplete_capture(captured, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(captured["out"], out, ignore=shutil.ignore_patterns("experiments"))
    folder = capture_folder(out)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:-1]
    manifest["complete"] = False
    (folder / "manifest.json").write_text(json.dumps(manifest))
    # the unrecorded last shard is still on disk and is adopted: the capture is complete again
    assert _train_cli(captured, out, "train.max_steps=3", "train.eval_every=3",
                      "train.baselines=[]", "train.num_workers=0") == 0
    for f in (folder / "shards").glob("*.parquet"):
        f.unlink()
        break
    assert _train_cli(captured, out) == 2
    assert "capture in" in (err := capsys.readouterr().err) and "is incomplete" in err
