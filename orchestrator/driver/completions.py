"""What a user reads after training besides the numbers: a few held-out prompts with the teacher's
and each student's greedy completions side by side (`report.md`, "Greedy completions").

The prompts are the first `train.report_prompts` sequences of the held-out capture (in sample-id
order, so every report of that capture shows the same ones): a sequence's prompt part where the
capture marks one (completion and chat records: the prompt or the conversation up to the assistant
turn, chat-rendered as the teacher saw it), else its first `train.bc_prompt_tokens` tokens. Each
model continues them greedily for `train.report_new_tokens` tokens, or to its end of text.

Everything runs in one Ray task with the teacher's resources (its GPUs on a cluster; transformers
`generate`, the teacher spread over them with `device_map="auto"`). The teacher's completions are
kept in the held-out capture's folder (`greedy-<key>.json`, named by the prompts and the length):
later reports of that capture, and a sweep's, do not load the teacher again.
"""

from __future__ import annotations

import hashlib
import json

from orchestrator.console import say
from orchestrator.storage import exists, filesystem, write_atomic

GREEDY_PREFIX = "greedy-"


def prompts_of(heldout_uri: str, *, count: int, prompt_tokens: int) -> list[list[int]]:
    """The report's prompts (token ids) from the held-out capture at `heldout_uri`."""
    from orchestrator.shards.format import read_shards

    samples = sorted(read_shards(heldout_uri, capture="heldout", verify=False),
                     key=lambda s: s["sample_id"])
    out = []
    for s in samples[:count]:
        ids = [int(t) for t in s["input_ids"]]
        cut = int(s["prompt_len"]) if 0 < int(s["prompt_len"]) < len(ids) else min(
            prompt_tokens, max(1, len(ids) // 2))
        out.append(ids[:cut])
    return out


def side_by_side(*, teacher: str, students: dict[str, str], heldout_uri: str, count: int,
                 prompt_tokens: int, new_tokens: int, num_gpus: float = 0.0) -> list[dict]:
    """[{prompt, teacher, <label>: completion, ...}] as text, one entry per prompt; [] when
    `count` is 0. `students`: label → Hugging Face directory."""
    if count <= 0:
        return []
    import ray

    prompts = prompts_of(heldout_uri, count=count, prompt_tokens=prompt_tokens)
    if not prompts:
        return []
    key = hashlib.sha256(json.dumps([teacher, prompts, new_tokens]).encode()).hexdigest()[:16]
    fs, root = filesystem(heldout_uri)
    cached_path = f"{root}/{GREEDY_PREFIX}{key}.json"
    cached = None
    if exists(fs, cached_path):
        with fs.open_input_stream(cached_path) as f:
            cached = json.loads(f.read())
    task = ray.remote(_generate).options(num_cpus=1, num_gpus=num_gpus)
    models = dict(students) if cached is not None else {"teacher": teacher, **students}
    say(f"report: greedy completions of {len(prompts)} held-out prompt(s) by "
        f"{', '.join(models)}")
    texts = ray.get(task.remote(models, prompts, new_tokens=new_tokens, tokenizer_of=teacher))
    if cached is None:
        write_atomic(fs, cached_path, json.dumps(texts["teacher"]).encode())
    else:
        texts["teacher"] = cached
    rows = []
    for i in range(len(prompts)):
        rows.append({"prompt": texts["prompts"][i], "teacher": texts["teacher"][i],
                     **{label: texts[label][i] for label in students}})
    return rows


def _generate(models: dict[str, str], prompts: list[list[int]], *, new_tokens: int,
              tokenizer_of: str) -> dict[str, list[str]]:
    """In the Ray task: each model's greedy continuation of each prompt, decoded; "prompts": the
    prompts decoded. Models are loaded one at a time and released."""
    import torch
    from transformers import AutoModelForCausalLM

    from orchestrator.teacher_info import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_of)
    out = {"prompts": [tokenizer.decode(p) for p in prompts]}
    gpu = torch.cuda.is_available()
    for label, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(
            _local(path), dtype=torch.bfloat16 if gpu else torch.float32,
            device_map="auto" if gpu else None)
        model.eval()
        device = next(model.parameters()).device
        texts = []
        for p in prompts:
            ids = torch.tensor([p], device=device)
            with torch.no_grad():
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id
                                     if tokenizer.pad_token_id is not None
                                     else tokenizer.eos_token_id)
            texts.append(tokenizer.decode(gen[0, len(p):], skip_special_tokens=False))
        out[label] = texts
        del model
    return out


def _local(path: str) -> str:
    """A local copy of a model directory on object storage (s3://…); a local path as it is."""
    if "://" not in path:
        return path
    import tempfile

    import pyarrow.fs as pafs

    fs, root = filesystem(path)
    local = tempfile.mkdtemp(prefix="raydistill-report-model-")
    pafs.copy_files(root, local, source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return local


def markdown(rows: list[dict], labels: dict[str, str]) -> list[str]:
    """The report's section: per prompt, a table of model → completion. `labels`: column key →
    display name (students, in the report's order)."""
    if not rows:
        return []
    lines = ["## Greedy completions", "",
             "Held-out prompts (as the teacher saw them), each continued greedily by every model. "
             "⏎ marks a line break.", ""]
    for i, row in enumerate(rows, 1):
        lines += [f"**Prompt {i}.** `{_cell(row['prompt'])[-300:]}`", "",
                  "| model | completion |", "|---|---|",
                  f"| teacher | {_cell(row['teacher'])} |"]
        lines += [f"| {name} | {_cell(row[key])} |" for key, name in labels.items() if key in row]
        lines.append("")
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "ˋ").replace("\r", "").replace("\n", "⏎")
