"""Bad input, everywhere: every row of docs/bad-input.md run through the real CLI.

Each case runs `orchestrator.driver.cli.main([...])` in-process and checks the exit code, the message's
key phrase (the problem and the fix), that no traceback is printed, and that nothing already
written changed: the commands point at a copy of a finished capture (the session's `captured`)
whose every file is compared byte for byte afterwards. Two subprocess runs show the real
`raydistill` script prints no traceback without --debug and one with it. A hypothesis fuzz
feeds the config loader random YAML and random values for the real keys: it returns a Config or
raises ConfigError naming a field, never anything else. The HTTP rows live in
tests/serve/test_fuzz_http.py; `test_the_doc_table_names_existing_tests` keeps docs and tests in
step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import capture_folder, free_port, run_cli, train_config, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bad-input.md"
RAYDISTILL = str(Path(sys.executable).with_name("raydistill"))


# --------------------------------------------------------------------------- helpers

def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (relative path → digest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _copy_capture(captured, dest: Path) -> Path:
    shutil.copytree(captured["out"], dest, ignore=shutil.ignore_patterns("experiments"))
    return dest


def _good_config(captured, out: Path) -> dict:
    """The full config (every section) of the session's capture, pointing at `out`."""
    return dataclasses.asdict(train_config(out, captured["model"], captured["data"]))


def _write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    return run_cli(argv, capsys)


def _assert_says(text: str, phrases) -> None:
    flat = " ".join(text.split())  # rich wraps long lines
    for phrase in phrases:
        assert phrase in flat, f"{phrase!r} not in {flat!r}"


@pytest.fixture(scope="module")
def victim(captured, tmp_path_factory):
    """A copy of the finished capture every failing command points at; must never change."""
    out = _copy_capture(captured, tmp_path_factory.mktemp("victim") / "out")
    cfg = _write_config(out.parent / "good.yaml", _good_config(captured, out))
    return {"out": out, "config": cfg, "before": _snapshot(out)}


@pytest.fixture
def intact(victim):
    yield victim
    assert _snapshot(victim["out"]) == victim["before"], "a failing command changed the capture"


# --------------------------------------------------------------------------- config files & fields

def _set(dotted: str, value):
    def mutate(cfg: dict) -> None:
        section, _, key = dotted.rpartition(".")
        (cfg[section] if section else cfg)[key] = value
    return mutate


def _set_all(**dotted):
    def mutate(cfg: dict) -> None:
        for key, value in dotted.items():
            _set(key.replace("__", "."), value)(cfg)
    return mutate


def _drop(dotted: str):
    def mutate(cfg: dict) -> None:
        section, key = dotted.split(".")
        del cfg[section][key]
    return mutate


def _rename_section(cfg: dict) -> None:
    cfg["teachers"] = cfg.pop("teacher")


def _typo_field(cfg: dict) -> None:
    cfg["teacher"]["modle"] = cfg["teacher"].pop("model")


def _model_dir(kind: str):
    """A teacher directory missing something: `none` (no directory), `weights`, `tokenizer`."""
    def mutate(cfg: dict, tmp_path: Path, teacher: str) -> None:
        d = tmp_path / f"model-{kind}"
        if kind != "none":
            d.mkdir()
            shutil.copy(Path(teacher) / "config.json", d)
            if kind == "tokenizer":
                for f in Path(teacher).glob("*.safetensors"):
                    shutil.copy(f, d)
        cfg["teacher"]["model"] = str(d)
    return mutate


def _student_dir(kind: str):
    """A pretrained student the teacher cannot distil into: `tokenizer` (another tokenizer) or
    `rows` (the teacher's tokenizer, 1000 embedding rows for its 1024 tokens)."""
    def mutate(cfg: dict, tmp_path: Path, teacher: str) -> None:
        from orchestrator.driver import tiny

        d = tmp_path / f"student-{kind}"
        d.mkdir()
        if kind == "tokenizer":
            tiny.train_tokenizer(list(tiny.chunks_of_text(tiny.stdlib_sources()[200:215])), d,
                                 vocab_size=1024)
        else:
            for f in Path(teacher).glob("*.json"):
                if f.name != "config.json":
                    shutil.copy(f, d)
        rows = 1024 if kind == "tokenizer" else 1000
        tiny.build_model(tiny.llama_config(rows, layers=1), d, seed=0)
        cfg["student"] = {"model": str(d)}
    return mutate


CONFIG_CASES = [
    pytest.param("text", "teacher: {model: [unclosed\n", ["is not valid YAML"], id="yaml-syntax"),
    pytest.param("text", "- teacher\n- data\n", ["must hold a mapping of sections, got list"],
                 id="not-a-mapping"),
    pytest.param("text", "", ["teacher.model is empty; set it to a local model directory"],
                 id="empty-file"),
    pytest.param("bytes", b"teacher:\n  model: \xff\xfe\n", ["is not UTF-8 text",
                                                             "save it as UTF-8"], id="not-utf8"),
    pytest.param("text", "teacher: {k: " + "9" * 5000 + "}\n", ["is not valid YAML", "4300 digits"],
                 id="huge-integer"),
    pytest.param("mutate", _set("teacher", 5), ["teacher must be a mapping of fields, got 5"],
                 id="section-not-a-mapping"),
    pytest.param("mutate", _rename_section, ["unknown config key 'teachers'",
                                             "(did you mean teacher?)"], id="unknown-section"),
    pytest.param("mutate", _typo_field, ["unknown config key teacher.modle",
                                         "(did you mean teacher.model?)"], id="unknown-field"),
    pytest.param("mutate", _set("teacher.k", "many"), ["teacher.k must be an integer, got 'many'"],
                 id="wrong-type"),
    pytest.param("mutate", _set("teacher.k", 3.5), ["teacher.k must be an integer, got 3.5"],
                 id="float-for-integer"),
    pytest.param("mutate", _set("train.use_gpu", 1), ["train.use_gpu must be true or false, got 1"],
                 id="number-for-bool"),
    pytest.param("mutate", _set("teacher.backend", "tgi"),
                 ["teacher.backend must be one of vllm | hf, got 'tgi'"], id="bad-choice"),
    pytest.param("mutate", _set("data.path", None),
                 ["data.path has no value (YAML null); set it to a string"], id="null-value"),
    pytest.param("mutate", _set("teacher.temperature", float("inf")),
                 ["teacher.temperature must be a finite number, got inf"], id="not-finite"),
    pytest.param("mutate", _set("teacher.k", 0), ["teacher.k must be at least 1, got 0"],
                 id="k-zero"),
    pytest.param("mutate", _set("teacher.k", 5000),
                 ["teacher.k must be between 1 and the vocabulary size (1024), got 5000"],
                 id="k-above-vocab"),
    pytest.param("mutate", _set("teacher.top_p", 1.5), ["teacher.top_p must be in (0, 1], got 1.5"],
                 id="top-p-out-of-range"),
    pytest.param("mutate", _set("teacher.memory_fraction", 1.5),
                 ["teacher.memory_fraction must be in (0, 1), got 1.5"],
                 id="memory-fraction-out-of-range"),
    pytest.param("mutate", _set("train.alpha", 2), ["train.alpha must be in [0, 1]"],
                 id="alpha-out-of-range"),
    pytest.param("mutate", _set("student.heads", 3),
                 ["student.heads (3) must divide student.hidden (128)"], id="heads-do-not-divide"),
    pytest.param("mutate", _set("serve.port", 70000),
                 ["serve.port must be between 1 and 65535, got 70000"], id="port-out-of-range"),
    pytest.param("mutate", _set("data.eval_fraction", 1),
                 ["data.eval_fraction must be in [0, 1), got 1"], id="eval-fraction-out-of-range"),
    pytest.param("mutate", _set_all(teacher__mode="sample", teacher__max_new_tokens=500),
                 ["teacher.max_new_tokens (500) leaves no room for a prompt"],
                 id="max-new-tokens-beyond-context"),
    pytest.param("mutate", _set("train.on_policy", 1.5),
                 ["train.on_policy must be in [0, 1] (the share of each batch from the "
                  "student's own samples), got 1.5"], id="on-policy-share-out-of-range"),
    pytest.param("mutate", _set_all(train__on_policy=0.5, on_policy__sync_every=4),
                 ["on_policy.sync_every 4 lets the rollout weights lag up to 3 steps, more than "
                  "on_policy.max_staleness 1", "raise max_staleness to at least 3"],
                 id="on-policy-staler-than-allowed"),
    pytest.param("mutate", _set_all(train__on_policy=1.0, on_policy__max_new_tokens=500),
                 ["on_policy.max_new_tokens (500) leaves no room for a prompt in data.max_length"],
                 id="on-policy-new-tokens-beyond-context"),
    pytest.param("mutate", _set("train.baselines", ["offline"]),
                 ["train.baselines has offline", "train.on_policy is 0",
                  "drop offline from train.baselines or set train.on_policy > 0"],
                 id="offline-baseline-without-on-policy"),
    pytest.param("mutate", _drop("teacher.model"),
                 ["teacher.model is empty; set it to a local model directory"],
                 id="missing-model-field"),
    pytest.param("model", _model_dir("none"), ["does not exist; set it to a model directory"],
                 id="missing-model-dir"),
    pytest.param("mutate", _set("teacher.model", "someorg/somemodel"),
                 ["teacher.model someorg/somemodel cannot be loaded", "does not download"],
                 id="hub-id-not-cached"),
    pytest.param("model", _model_dir("weights"), ["has a config.json but no weights"],
                 id="model-without-weights"),
    pytest.param("model", _model_dir("tokenizer"), ["its tokenizer cannot be loaded"],
                 id="model-without-tokenizer"),
    pytest.param("mutate", _set("student.model", "/models/student"),
                 ["sets both student.model (/models/student) and student.preset (nano)",
                  "remove student.preset to start from the model, or student.model"],
                 id="student-model-and-preset"),
    pytest.param("mutate", _set("student", {"model": "/models/none"}),
                 ["student.model /models/none does not exist"], id="student-model-missing"),
    pytest.param("model", _student_dir("tokenizer"),
                 ["its tokenizer differs from the teacher's at id",
                  "cross-tokenizer distillation is not supported"],
                 id="student-other-tokenizer"),
    pytest.param("model", _student_dir("rows"),
                 ["has 1000 embedding rows but its tokenizer (the teacher's) has 1024 tokens"],
                 id="student-table-smaller-than-tokenizer"),
    pytest.param("mutate", _set("data.eval_path", "${RAYDISTILL_TEST_UNSET}/e.jsonl"),
                 ["data.eval_path ${RAYDISTILL_TEST_UNSET}/e.jsonl uses the environment variable "
                  "RAYDISTILL_TEST_UNSET, which is not set; export RAYDISTILL_TEST_UNSET="],
                 id="unset-variable-in-a-path"),
]


@pytest.mark.parametrize("kind, change, phrases", CONFIG_CASES)
def test_config_file(kind, change, phrases, intact, captured, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAYDISTILL_TEST_UNSET", raising=False)
    path = tmp_path / "c.yaml"
    if kind == "text":
        path.write_text(change)
    elif kind == "bytes":
        path.write_bytes(change)
    else:
        cfg = _good_config(captured, intact["out"])
        if kind == "model":
            change(cfg, tmp_path, captured["model"])
        else:
            change(cfg)
        _write_config(path, cfg)
    code, text = _cli(["capture", str(path)], capsys)
    assert code == 2
    _assert_says(text, phrases)


# --------------------------------------------------------------------------- dataset lines & files

GOOD = json.dumps({"text": "x = 1"})
CHAT = json.dumps({"messages": [{"role": "user", "content": "x?"},
                                {"role": "assistant", "content": "x = 1"}]})

DATA_CASES = [
    pytest.param("missing", None, {}, ["does not exist; point it at a JSONL file"],
                 id="missing-file"),
    pytest.param("eval-missing", None, {},
                 ["data.eval_path", "e.jsonl does not exist; point it at a JSONL file"],
                 id="missing-eval-file"),
    pytest.param("dir", None, {}, ["is a directory without *.jsonl files"],
                 id="directory-without-jsonl"),
    pytest.param("bytes", b"", {}, ["holds no usable records"], id="empty-file"),
    pytest.param("bytes", b"\n  \n\n", {}, ["holds no usable records"], id="blank-lines-only"),
    pytest.param("lines", [GOOD, '{"text": "oops'], {},
                 ["d.jsonl:2: malformed JSON", "or set data.on_bad_line=skip"],
                 id="malformed-json"),
    pytest.param("lines", ["[1, 2]"], {}, ["d.jsonl:1: expected a JSON object, got list"],
                 id="not-an-object"),
    pytest.param("lines", [GOOD, '{"txt": "x"}'], {}, ["d.jsonl:2: missing string field 'text'"],
                 id="missing-text-field"),
    pytest.param("lines", ['{"text": 5}'], {},
                 ["d.jsonl:1: field 'text' must be a string, got int"],
                 id="non-string-text"),
    pytest.param("lines", ['{"text": ""}'], {}, ["d.jsonl:1: empty 'text'"], id="empty-text"),
    pytest.param("bytes", (GOOD + "\n").encode() * 200 + b'{"text": "caf\xe9"}\n' + b"x\n",
                 {}, ["d.jsonl:201: not UTF-8 text (byte 14 of the line", "save the file as UTF-8"],
                 id="invalid-utf8"),
    pytest.param("lines", ['{"text": "a\\ud800b"}'], {},
                 ["d.jsonl:1: 'text' holds an unpaired surrogate escape ('\\ud800' at "
                  "character 2)"],
                 id="surrogate-escape"),
    pytest.param("lines", ['{"id": 1, "text": "a"}', '{"id": 1, "text": "b"}'], {},
                 ["d.jsonl:2: id '1' was already used at", "sample ids must be unique"],
                 id="duplicate-id"),
    pytest.param("lines", ["not json", '{"text": 5}'], {"on_bad_line": "skip"},
                 ["holds no usable records (2 bad lines skipped)"], id="all-lines-bad-skipped"),
    pytest.param("lines", [GOOD, '{"prompt": "Q", "completion": "A"}'], {},
                 ["d.jsonl:2: a completion record in a file of text records (data.format=auto "
                  "decided from line 1); one file holds one format — move these records to a "
                  "file of their own, or set data.format"], id="mixed-formats"),
    pytest.param("lines", [CHAT], {},
                 ["the data holds chat records but the teacher", "has no chat template",
                  "set data.chat_template to a Jinja template file"], id="chat-without-template"),
    pytest.param("lines", [CHAT], {"chat_template": "/nonexistent/chat.jinja"},
                 ["data.chat_template /nonexistent/chat.jinja cannot be read"],
                 id="chat-template-missing"),
    pytest.param("lines", ['{"messages": [{"role": "user", "content": "hi"}]}'], {},
                 ["d.jsonl:1: a chat record without an 'assistant' message has nothing to learn",
                  "data.train_on_prompt=true"], id="chat-without-reply"),
]


@pytest.mark.parametrize("kind, content, data_sets, phrases", DATA_CASES)
def test_dataset(kind, content, data_sets, phrases, intact, captured, tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    if kind == "dir":
        path = tmp_path / "data"
        path.mkdir()
        (path / "notes.txt").write_text("not a dataset")
        (path / "sub.jsonl").mkdir()  # a directory named like a dataset file is not one
    elif kind == "bytes":
        path.write_bytes(content)
    elif kind == "lines":
        write_jsonl(path, content)
    cfg = _good_config(captured, intact["out"])
    if kind == "eval-missing":  # data.path is fine; the held-out file named by eval_path is not
        cfg["data"]["eval_path"] = str(tmp_path / "e.jsonl")
    else:
        cfg["data"] |= {"path": str(path), **data_sets}
    code, text = _cli(["capture", str(_write_config(tmp_path / "c.yaml", cfg))], capsys)
    assert code == 2
    _assert_says(text, phrases)


def test_edited_dataset_is_another_capture_a_moved_one_resumes(captured, tmp_path, capsys):
    """Captures are content-addressed: the dataset copied elsewhere (same bytes) resumes the
    capture; one byte of it edited, it is another capture — `train` says it is not captured
    yet and which command captures it (beside the first one, which stays as it was)."""
    out = _copy_capture(captured, tmp_path / "out")
    moved = tmp_path / "moved" / Path(captured["data"]).name
    moved.parent.mkdir()
    shutil.copy(captured["data"], moved)
    cfg = _good_config(captured, out)
    cfg["data"]["path"] = str(moved)
    path = _write_config(tmp_path / "c.yaml", cfg)
    before = _snapshot(out)
    code, text = _cli(["capture", str(path)], capsys)
    assert code == 0, text
    _assert_says(text, ["capture: complete"])
    assert _snapshot(out) == before
    moved.write_bytes(moved.read_bytes().replace(b"def ", b"def  ", 1))
    code, text = _cli(["train", str(path)], capsys)
    assert code == 2
    _assert_says(text, [f"this config's capture is not in {out} yet (it goes to {out}/captures/main-",
                        "`raydistill capture CONFIG` captures it, or `raydistill run CONFIG` "
                        f"captures and trains. {out} holds 3 capture(s) of other settings or "
                        f"data: `raydistill inspect {out}` lists them"])
    assert _snapshot(out) == before


def test_skipped_lines_are_counted_and_the_rest_captured(tiny_teacher, ray_session, tmp_path,
                                                         capsys):
    """on_bad_line=skip: bad lines (not UTF-8, malformed, non-string text) are named and counted;
    every good line is captured, including the ones next to a line that is not UTF-8 and a
    first line with a UTF-8 byte-order mark."""
    from orchestrator.shards.format import read_shards

    lines = [b"\xef\xbb\xbf" + json.dumps({"text": "def a(): pass"}).encode(),
             json.dumps({"text": "x = 1"}).encode(), b'{"text": "caf\xe9"}',
             json.dumps({"text": "y = 2"}).encode(), b'{"text": "oops',
             json.dumps({"text": 7}).encode(), json.dumps({"text": "z = 3"}).encode()]
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    cfg = dataclasses.asdict(train_config(tmp_path / "out", tiny_teacher, str(data),
                                          **{"train.baselines": "[]", "data.eval_fraction": 0}))
    cfg["data"]["on_bad_line"] = "skip"
    code, text = _cli(["capture", str(_write_config(tmp_path / "c.yaml", cfg))], capsys)
    assert code == 0, text
    _assert_says(text, ["3 bad lines skipped", "d.jsonl:3: not UTF-8 text", "d.jsonl:5: malformed"])
    got = sorted(s["sample_id"] for s in read_shards(str(tmp_path / "out")))
    assert got == ["d.jsonl:1", "d.jsonl:2", "d.jsonl:4", "d.jsonl:7"]


# --------------------------------------------------------------------------- first attempts & paths

FIRST_ATTEMPT_CASES = [
    pytest.param("capture", "data.eval_path", "{tmp}/missing.jsonl",
                 "data.eval_path {tmp}/missing.jsonl does not exist", id="missing-eval-file"),
    pytest.param("run", "data.path", "{tmp}/missing.jsonl",
                 "data.path {tmp}/missing.jsonl does not exist", id="missing-data-file"),
    pytest.param("capture", "teacher.model", "{tmp}/no-teacher",
                 "teacher.model {tmp}/no-teacher does not exist", id="missing-teacher"),
    pytest.param("capture", "teacher.k", 5000,
                 "teacher.k must be between 1 and the vocabulary size", id="k-above-vocab"),
    pytest.param("run", "train.bc_prompt_tokens", 500,
                 "train.bc_prompt_tokens (500) leaves no room for a continuation",
                 id="bc-prompt-leaves-no-room"),
    pytest.param("tune", "data.eval_fraction", 0,
                 "tune ranks students on held-out metrics: set data.eval_path",
                 id="tune-without-heldout"),
]


@pytest.mark.parametrize("command, key, value, phrase", FIRST_ATTEMPT_CASES)
def test_a_failed_first_attempt_writes_nothing(command, key, value, phrase, captured, tmp_path,
                                               capsys):
    """Every input is checked before anything is written: a first attempt refused for a bad
    input leaves no output_dir at all, so the corrected rerun is a first attempt again."""
    out = tmp_path / "out"
    cfg = _good_config(captured, out)
    _set(key, value.format(tmp=tmp_path) if isinstance(value, str) else value)(cfg)
    code, text = _cli([command, str(_write_config(tmp_path / "c.yaml", cfg))], capsys)
    assert code == 2
    _assert_says(text, [phrase.format(tmp=tmp_path)])
    assert not out.exists(), sorted(str(p) for p in out.rglob("*"))


def test_the_corrected_rerun_needs_no_fresh(tiny_teacher, texts, ray_session, tmp_path,
                                            monkeypatch, capsys):
    """The first hour: the held-out file named with `~` and mistyped — refused, naming
    data.eval_path, nothing written; corrected, the same command captures without --fresh; the
    same files spelled otherwise (absolute, $VAR) resume it; the held-out file edited is a new
    held-out capture beside the first (the main capture resumed: the held-out file is not in its
    fingerprint)."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("RD_DATA", str(home / "d"))
    (home / "d").mkdir(parents=True)
    write_jsonl(home / "d" / "train.jsonl",
                [{"id": i, "text": t} for i, t in enumerate(texts[:16])])
    held = home / "d" / "heldout.jsonl"
    write_jsonl(held, [{"id": i, "text": t} for i, t in enumerate(texts[16:24])])
    out = tmp_path / "out"
    cfg = dataclasses.asdict(train_config(out, tiny_teacher, str(home / "d" / "train.jsonl"),
                                          **{"train.baselines": "[]"}))
    cfg["data"] |= {"path": "~/d/train.jsonl", "eval_path": "~/d/heldout.jsonl.txt"}
    path = _write_config(tmp_path / "c.yaml", cfg)
    code, text = _cli(["capture", str(path)], capsys)
    assert code == 2
    _assert_says(text, [f"data.eval_path {held}.txt does not exist"])
    assert not out.exists()

    cfg["data"]["eval_path"] = "~/d/heldout.jsonl"
    code, text = _cli(["capture", str(_write_config(path, cfg))], capsys)
    assert code == 0, text
    _assert_says(text, ["held-out: k=8"])
    assert (capture_folder(out, "heldout") / "manifest.json").is_file()
    before = _snapshot(out)

    cfg["data"] |= {"path": "$RD_DATA/train.jsonl", "eval_path": str(held)}
    code, text = _cli(["capture", str(_write_config(path, cfg))], capsys)
    assert code == 0, text
    _assert_says(text, ["capture: complete", "held-out: complete"])
    assert _snapshot(out) == before

    held.write_text(held.read_text() + json.dumps({"id": 99, "text": "x = 1"}) + "\n")
    code, text = _cli(["capture", str(path)], capsys)
    assert code == 0, text  # another held-out capture, beside the first
    _assert_says(text, ["capture: complete", "held-out: k=8", f"{out} also holds 1 other "
                        "capture(s)"])
    assert {k: v for k, v in _snapshot(out).items() if k in before} == before


def test_a_failed_first_attempt_leaves_no_obstacle(captured, tmp_path, capsys):
    """A first attempt that failed after its manifests were written (a teacher that did not
    start) left captures without a shard, in the folders of its settings: the corrected config
    plans its own beside them, no --fresh needed, and they stay (resumable, if ever rerun)."""
    from orchestrator.shards.dirs import list_captures
    from orchestrator.shards.plan import plan_captures
    from orchestrator.config import load_config

    out = tmp_path / "out"
    path = _write_config(tmp_path / "c.yaml", _good_config(captured, out))
    failed = plan_captures(load_config(path, ["teacher.k=4"]))  # the failed attempt got this far
    plans = plan_captures(load_config(path), command="run")
    _assert_says(capsys.readouterr().err, [f"{out} also holds 3 other capture(s) (0.0 MB)"])
    assert {p.cfg.output_dir for p in plans}.isdisjoint({p.cfg.output_dir for p in failed})
    assert len(list_captures(str(out))) == 6


FOLDER_ADVICE_CASES = [pytest.param(c, id=c) for c in ("capture", "run", "train", "tune")]


@pytest.mark.parametrize("command", FOLDER_ADVICE_CASES)
def test_an_unresumable_capture_folder_gets_advice_the_command_accepts(command, captured,
                                                                       tmp_path, capsys):
    """`raydistill COMMAND` on a capture folder of this config that holds shards but no
    manifest: refused, nothing changed, and each way out the message names parses as a command
    line of this raydistill (`train` has no --fresh: it names `capture`/`run --fresh`)."""
    from orchestrator.driver.cli import _parser

    out = _copy_capture(captured, tmp_path / "out")
    (capture_folder(out) / "manifest.json").unlink()
    cfg = _write_config(tmp_path / "c.yaml", _good_config(captured, out))
    before = _snapshot(out)
    code, text = _cli([command, str(cfg)], capsys)
    assert code == 2
    flat = " ".join(text.split())
    _assert_says(flat, [f"{out}/captures/main-", "has a shards/ folder but no manifest.json; it "
                        "is not a capture this config can resume. Delete the folder, or"])
    advised = [m.split() for m in re.findall(r"`raydistill ([^`]+)`", flat)]
    if "rerun with --fresh" in flat:
        advised.append([command, "CONFIG", "--fresh"])
    assert advised, flat
    for argv in advised:  # argparse exits (status 2) on an option the command does not take
        args = _parser().parse_args([str(cfg) if a == "CONFIG" else a for a in argv])
        assert args.fresh
    assert _snapshot(out) == before and not (out / "experiments").exists()


@pytest.mark.slow
def test_tune_fresh_recaptures_then_sweeps(captured, tmp_path, capsys):
    """`raydistill tune CONFIG --fresh` deletes this config's captures (the main and held-out
    ones a sweep uses; not the bc samples, which it does not use and which stay valid), captures
    them again, then sweeps."""
    out = _copy_capture(captured, tmp_path / "out")
    cfg = _good_config(captured, out)
    cfg["tune"] |= {"space": {"train.temperature": {"grid": [1.0]}}, "max_steps": 2,
                    "eval_every": 2, "latency_tokens": 2, "scheduler": "fifo"}
    path = _write_config(tmp_path / "c.yaml", cfg)
    sweeps = set((out / "sweeps").glob("*"))
    folders = {kind: capture_folder(out, kind) for kind in ("main", "heldout", "bc")}
    shards = {kind: {p: p.stat().st_mtime_ns for p in (f / "shards").glob("*.parquet")}
              for kind, f in folders.items()}
    code, text = _cli(["tune", str(path), "--fresh"], capsys)
    assert code == 0, text
    for kind in ("main", "heldout"):
        _assert_says(text, [f"--fresh: deleting this config's capture in {folders[kind]}"])
        again = {p: p.stat().st_mtime_ns for p in (folders[kind] / "shards").glob("*.parquet")}
        assert again and not again.items() & shards[kind].items()  # every shard captured again
    assert {p: p.stat().st_mtime_ns for p in (folders["bc"] / "shards").glob("*.parquet")} == \
        shards["bc"]
    (sweep,) = set((out / "sweeps").glob("*")) - sweeps
    assert (sweep / "leaderboard.csv").is_file()


# --------------------------------------------------------------------------- shard files & manifest

def _rewrite_shard(out: Path, name: str, **meta_changes) -> None:
    """Rewrite one shard with changed schema metadata, and record its new checksum (as a capture
    of another teacher or format would have it)."""
    from orchestrator.shards.format import META_KEY

    path = out / "shards" / name
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[META_KEY]) | meta_changes
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    pq.write_table(table, path, compression="zstd")
    manifest = json.loads((out / "manifest.json").read_text())
    for s in manifest["shards"]:
        if s["file"] == name:
            s["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            s["bytes"] = path.stat().st_size
    (out / "manifest.json").write_text(json.dumps(manifest))


def _truncate(out: Path) -> None:
    p = out / "shards" / "shard-000002.parquet"
    p.write_bytes(p.read_bytes()[:100])


def _flip(out: Path) -> None:
    p = out / "shards" / "shard-000002.parquet"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _manifest(content: bytes):
    return lambda out: (out / "manifest.json").write_bytes(content)


def _renamed(out: Path) -> None:
    m = json.loads((out / "manifest.json").read_text())
    m["fingerprint"] = "0123456789abcdef"  # a capture folder copied over another by hand
    (out / "manifest.json").write_text(json.dumps(m))


SHARD_CASES = [
    pytest.param(_truncate, "train", [], ["shard-000002.parquet does not match its checksum",
                                          "raydistill capture CONFIG --repair"],
                 id="truncated-shard"),
    pytest.param(_flip, "train", [], ["shard-000002.parquet does not match its checksum",
                                      "raydistill capture CONFIG --repair"], id="flipped-byte"),
    pytest.param(_manifest(b"{not json"), "train", [],
                 ["manifest.json is not a valid raydistill manifest",
                  "rerun the capture with --fresh"], id="manifest-not-json"),
    pytest.param(_manifest(b"\xff\xfe{}"), "train", [],
                 ["manifest.json is not a valid raydistill manifest"], id="manifest-not-utf8"),
    pytest.param(_manifest(b"[1, 2]"), "capture", [],
                 ["manifest.json is not a valid raydistill manifest (expected a JSON object"],
                 id="manifest-not-an-object"),
    pytest.param(_manifest(b'{"fingerprint": "x"}'), "capture", [],
                 ["manifest.json is not a valid raydistill manifest"],
                 id="manifest-missing-fields"),
    pytest.param(_renamed, "capture", [],
                 ["holds a capture of fingerprint 0123456789abcdef, not the",
                  "its name says (a folder copied or renamed by hand); delete the folder, or "
                  "rerun with --fresh to delete it and start over"], id="manifest-of-another-name"),
    pytest.param(lambda out: (out / "manifest.json").unlink(), "capture", [],
                 ["has a shards/ folder but no manifest.json", "rerun with --fresh"],
                 id="shards-without-manifest"),
    pytest.param(lambda out: None, "train", ["--set", "teacher.k=4"],
                 ["this config's capture is not in", "`raydistill capture CONFIG` captures it"],
                 id="train-without-its-capture"),
    pytest.param(lambda out: _rewrite_shard(out, "shard-000000.parquet",
                                            tokenizer_fingerprint="feedfacefeedface"),
                 "train", [], ["was captured with another tokenizer ('feedfacefeedface')",
                               "recapture with --fresh"], id="another-tokenizer"),
    pytest.param(lambda out: _rewrite_shard(out, "shard-000000.parquet", long_text="truncate"),
                 "train", [], ["was captured otherwise than the config says: long_text "
                               "'truncate' (the config's: 'split')", "Recapture with --fresh"],
                 id="captured-otherwise"),
    pytest.param(lambda out: _rewrite_shard(out, "shard-000000.parquet", format_version=3),
                 "inspect", [], ["has shard format 3", "this raydistill reads format 4"],
                 id="other-shard-format"),
    pytest.param(lambda out: _rewrite_shard(out, "shard-000000.parquet", format_version=3),
                 "train", [], ["has shard format 3", "this raydistill reads format 4"],
                 id="other-shard-format-train"),
    pytest.param(lambda out: (out / "shards" / "shard-000000.parquet").write_bytes(b"PAR1oops"),
                 "inspect", [], ["shard-000000.parquet is not a readable Parquet file"],
                 id="first-shard-not-parquet"),
]


@pytest.mark.parametrize("damage, command, extra, phrases", SHARD_CASES)
def test_shards(damage, command, extra, phrases, captured, tmp_path, capsys):
    out = _copy_capture(captured, tmp_path / "out")
    cfg = _write_config(tmp_path / "c.yaml", _good_config(captured, out))
    damage(capture_folder(out))
    before = _snapshot(out)
    argv = [command, str(out)] if command == "inspect" else [command, str(cfg), *extra]
    code, text = _cli(argv, capsys)
    assert code == 2
    _assert_says(text, phrases)
    assert _snapshot(out) == before  # refused: nothing deleted, nothing rewritten
    assert not (out / "experiments").exists()


def test_shard_listed_but_missing(captured, tmp_path, capsys):
    """The missing shard is dropped from the manifest (to be recaptured); train refuses the now
    incomplete capture; every other shard stays as it was."""
    out = _copy_capture(captured, tmp_path / "out")
    cfg = _write_config(tmp_path / "c.yaml", _good_config(captured, out))
    folder = capture_folder(out)
    (folder / "shards" / "shard-000001.parquet").unlink()
    before = _snapshot(folder)
    code, text = _cli(["train", str(cfg)], capsys)
    assert code == 2
    _assert_says(text, ["1 listed shards were missing", "is incomplete",
                        "run `raydistill capture CONFIG` first"])
    after = _snapshot(folder)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}
    listed = [s["file"] for s in json.loads((folder / "manifest.json").read_text())["shards"]]
    assert "shard-000001.parquet" not in listed and "shard-000002.parquet" in listed


def test_leftover_tmp_files_are_removed_on_resume(captured, tmp_path, capsys):
    out = _copy_capture(captured, tmp_path / "out")
    cfg = _write_config(tmp_path / "c.yaml", _good_config(captured, out))
    before = _snapshot(out)
    (capture_folder(out) / "shards" / "shard-000000.parquet.123-abcd.tmp").write_bytes(b"x")
    code, text = _cli(["capture", str(cfg)], capsys)
    assert code == 0, text
    _assert_says(text, ["capture: complete"])
    assert _snapshot(out) == before  # the .tmp is gone; every shard and the manifest unchanged


# --------------------------------------------------------------------------- CLI arguments

CLI_CASES = [
    pytest.param(["frobnicate"], ["invalid choice: 'frobnicate'"], id="unknown-verb"),
    pytest.param(["capture"], ["the following arguments are required: config"],
                 id="missing-config-argument"),
    pytest.param(["capture", "{tmp}/none.yaml"],
                 ["none.yaml does not exist; pass the path of a YAML run config"],
                 id="nonexistent-config"),
    pytest.param(["capture", "{tmp}"], ["is a directory; pass the path of a YAML run config"],
                 id="config-is-a-directory"),
    pytest.param(["capture", "{good}", "--set", "teacher.k"],
                 ["--set 'teacher.k' must look like key=value, e.g. --set teacher.k=32"],
                 id="set-without-equals"),
    pytest.param(["capture", "{good}", "--set", "teacher.kk=1"],
                 ["unknown config key teacher.kk", "(did you mean teacher.k?)"],
                 id="set-unknown-key"),
    pytest.param(["capture", "{good}", "--set", "teacher.k=abc"],
                 ["teacher.k must be an integer, got 'abc'"], id="set-bad-value"),
    pytest.param(["capture", "{good}", "--set", "teacher.k.x=1"],
                 ["--set teacher.k.x: k is not a section"], id="set-into-a-field"),
    pytest.param(["train", "{good}", "--resume", "nope"],
                 ["--resume nope: no experiment of that name", "omit --resume"],
                 id="train-resume-unknown"),
    pytest.param(["tune", "{good}", "--resume", "nope"],
                 ["--resume nope: no sweep of that name", "omit --resume"],
                 id="tune-resume-unknown"),
    pytest.param(["tune", "{good}", "--space", "nope"],
                 ["neither a space in tune_spaces/"], id="tune-unknown-space"),
    pytest.param(["serve", "{tmp}"], ["holds no finished students", "run `raydistill tune`"],
                 id="serve-no-students"),
    pytest.param(["serve", "{tmp}/nowhere"], ["nowhere is not a directory"],
                 id="serve-missing-dir"),
    pytest.param(["serve", "{tmp}", "--top", "0"], ["argument --top: must be at least 1, got 0"],
                 id="serve-top-zero"),
    pytest.param(["serve", "{tmp}", "--set", "teacher.k=3"],
                 ["serving takes only serve.* settings"], id="serve-non-serve-setting"),
    pytest.param(["serve", "{tmp}", "--set", "serve.port=0"],
                 ["serve.port must be between 1 and 65535, got 0"], id="serve-bad-port"),
    pytest.param(["query", "hi", "--url", "http://127.0.0.1:{port}"],
                 ["no server at http://127.0.0.1:", "start one with `raydistill serve RUN_DIR`"],
                 id="query-no-server"),
    pytest.param(["query", "hi", "--max-tokens", "-3"],
                 ["argument --max-tokens: must be at least 1, got -3"], id="query-bad-max-tokens"),
    pytest.param(["jobs", "logs"], ["`raydistill jobs logs` needs a job id"],
                 id="jobs-logs-without-id"),
    pytest.param(["capture", "{good}", "--", "run"],
                 ["only `raydistill submit` takes a command after --"], id="command-after-dashes"),
    pytest.param(["submit", "{good}", "--", "frobnicate"],
                 ["`raydistill submit ... -- frobnicate` is not a job command"],
                 id="submit-unknown-job-command"),
]


@pytest.mark.parametrize("argv, phrases", CLI_CASES)
def test_cli_arguments(argv, phrases, intact, tmp_path, capsys):
    fill = {"tmp": str(tmp_path), "good": str(intact["config"]), "port": str(free_port())}
    code, text = _cli([a.format(**fill) for a in argv], capsys)
    assert code == 2
    _assert_says(text, phrases)


def test_set_into_an_empty_yaml_section(captured, intact, tmp_path, capsys):
    """`teacher:` with nothing under it (YAML null) is an empty section `--set` can fill."""
    cfg = _good_config(captured, intact["out"])
    teacher = cfg.pop("teacher")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False) + "teacher:\n")
    sets = [x for k in ("model", "backend", "k", "num_cpus", "max_new_tokens")
            for x in ("--set", f"teacher.{k}={teacher[k]}")]
    code, text = _cli(["capture", str(path), *sets], capsys)
    assert code == 0, text
    _assert_says(text, ["capture: complete"])


@pytest.mark.parametrize("debug", [False, True], ids=["no-traceback", "debug-traceback"])
def test_the_real_script_prints_a_traceback_only_with_debug(debug, tmp_path):
    argv = [RAYDISTILL, *(["--debug"] if debug else []), "serve", str(tmp_path / "nowhere")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == (1 if debug else 2)
    if debug:
        assert "Traceback" in done.stderr and "RaydistillError: " in done.stderr
    else:
        assert done.stderr.strip().splitlines() == [
            f"raydistill: error: {tmp_path / 'nowhere'} is not a directory; pass a sweep directory "
            "(output_dir/sweeps/<name>), an experiment directory, a model directory or an "
            "output_dir"]
        assert done.stdout == ""


# --------------------------------------------------------------------------- config fuzz

def _fuzz_strategies():
    from hypothesis import strategies as st

    from orchestrator.config import _SECTIONS

    fields = {name: sorted(f.name for f in dataclasses.fields(cls))
              for name, cls in _SECTIONS.items()}
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-3, 70000), st.integers(), st.floats(),
        st.text(max_size=12), st.sampled_from(["score", "sample", "hf", "vllm", "nano", "fkl",
                                               "skip", "stop", "[hard]", "1e3", "~/x", ""]),
        st.dates())
    values = st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
        max_leaves=6)
    section = st.sampled_from(sorted(fields)).flatmap(lambda name: st.tuples(
        st.just(name), st.dictionaries(st.sampled_from(fields[name]) | st.text(max_size=8),
                                       values, max_size=5)))
    configs = st.lists(section, max_size=4).map(dict).flatmap(lambda d: st.fixed_dictionaries(
        {}, optional={"output_dir": values, "extra": values}).map(lambda top: d | top))
    keys = [f"{s}.{f}" for s, names in fields.items() for f in names] + ["output_dir"]
    overrides = st.lists(st.tuples(st.sampled_from(keys) | st.text(max_size=10),
                                   st.text(max_size=12)).map(lambda kv: f"{kv[0]}={kv[1]}")
                         | st.text(max_size=12), max_size=3)
    return st, configs, overrides, keys


def _named_a_field(message: str, keys: list[str]) -> bool:
    from orchestrator.config import _SECTIONS

    words = (*keys, *_SECTIONS, "config key", "config file", "--set", "student")
    return any(w in message for w in words)


def test_fuzz_config_loader_raises_only_config_errors(tmp_path):
    """Random nested mappings over the real keys with random-typed values, random `--set`
    overrides, and mangled YAML text: load_config returns a Config or raises a ConfigError that
    names a field (or the file) — never another exception."""
    from hypothesis import HealthCheck, example, given, settings

    from orchestrator.config import Config, load_config
    from orchestrator.errors import ConfigError

    st, configs, overrides, keys = _fuzz_strategies()
    base = ["teacher.model=/m", "data.path=/d.jsonl", "output_dir=/o"]
    path = tmp_path / "fuzz.yaml"

    def check(text: str | bytes, sets: list[str]) -> None:
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        for argv in (sets, base + sets):
            try:
                assert isinstance(load_config(path, argv), Config)
            except ConfigError as e:
                assert _named_a_field(str(e), keys), str(e)

    @settings(max_examples=100, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(cfg=configs, sets=overrides, cut=st.integers(0, 400), junk=st.text(max_size=3))
    @example(cfg={"teacher": {"k": 10**400}}, sets=[], cut=0, junk="")
    @example(cfg={"teacher": None}, sets=["teacher.k=5", "data.path=" + "9" * 5000], cut=0,
             junk="")
    def fuzz(cfg, sets, cut, junk):
        text = yaml.safe_dump(cfg, allow_unicode=True)
        check(text, sets)
        if cut:  # the same YAML, mangled: a cut, a stray character, a deep nest
            check(text[:cut] + junk + text[cut:], sets)

    fuzz()
    for text in ("[" * 5000, "&a [*a]", "teacher: &a {k: *a}", "? [1, 2]\n: 3", "\ud800: 1"):
        check(text, [])


# --------------------------------------------------------------------------- the doc table

def _case_ids(module) -> set[str]:
    """`test_name[id]` for each parametrized case of a test module, `test_name` for the rest."""
    names = set()
    for name, fn in vars(module).items():
        if not name.startswith("test_") or not callable(fn):
            continue
        marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
        if not marks:
            names.add(name)
        for mark in marks:
            for i, p in enumerate(mark.args[1]):
                ident = getattr(p, "id", None) or (mark.kwargs.get("ids") or [])[i]
                names.add(f"{name}[{ident}]")
    return names


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"_doc_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_doc_table_names_existing_tests():
    """Every row of docs/bad-input.md names a test case that exists, and every table-driven case
    has its row: the table and the tests cannot drift apart."""
    here = sys.modules[__name__]
    http = _load(ROOT / "tests" / "serve" / "test_fuzz_http.py")
    known = {f"test_bad_input.py::{n}" for n in _case_ids(here)}
    known |= {f"serve/test_fuzz_http.py::{n}" for n in _case_ids(http)}
    rows = [line for line in DOC.read_text().splitlines()
            if line.startswith("|") and not re.match(r"\|\s*-", line)]
    cited = []
    for row in rows:
        cited += re.findall(r"`((?:serve/)?test_[a-z_]+\.py::[^`]+)`", row.split("|")[-2])
    assert len(cited) >= 60
    assert not set(cited) - known, f"rows naming no test: {sorted(set(cited) - known)}"
    row_driven = {k for k in known if "[" in k and not k.split("::")[1].startswith(
        ("test_the_real_script", "test_fuzz"))}
    assert not row_driven - set(cited), f"cases without a row: {sorted(row_driven - set(cited))}"
