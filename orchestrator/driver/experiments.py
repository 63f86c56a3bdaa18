"""An experiment (`run`, `train`) around its students (driver-internal): its name or the one to
resume, what Ctrl-C says, and its report (report.md, report.json, plots)."""

from __future__ import annotations

from dataclasses import asdict

from orchestrator.config import Config
from orchestrator.console import say
from orchestrator.errors import ConfigError, RaydistillError
from orchestrator.names import EXPERIMENTS_DIR, experiment_dir, run_name
from orchestrator.shards.plan import CapturePlan
from orchestrator.storage import exists, filesystem


def experiment(cfg: Config, resume: str | None) -> str:
    """A new unique experiment name, or the one to resume (it must exist)."""
    from orchestrator.train.layout import batch_layout
    from orchestrator.train.launch import check_experiment_layout

    if resume is None:
        return run_name("exp")
    fs, root = filesystem(cfg.output_dir)
    if not exists(fs, experiment_dir(root, resume)):
        raise ConfigError(f"--resume {resume}: no experiment of that name in "
                          f"{cfg.output_dir}/{EXPERIMENTS_DIR}; omit --resume to start a new one")
    check_experiment_layout(fs, experiment_dir(root, resume),
                            batch_layout(batch_size=cfg.train.batch_size,
                                         grad_accum=cfg.train.grad_accum,
                                         num_workers=cfg.train.num_workers, seed=cfg.train.seed,
                                         max_tokens_per_batch=cfg.train.max_tokens_per_batch
                                         if cfg.train.packing else None,
                                         shuffle_shards=cfg.train.shuffle_shards))
    return resume


class interruptible:
    """Ctrl-C during training: checkpoints are kept; say how to continue."""

    def __init__(self, experiment: str):
        self.experiment = experiment

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is KeyboardInterrupt:
            raise RaydistillError(
                f"interrupted: experiment {self.experiment}'s checkpoints and finished shards are "
                f"kept; continue with the same command plus --resume {self.experiment}") from None
        return False


def report(cfg: Config, plans: list[CapturePlan], experiment: str, results: dict,
           streaming: dict | None = None) -> str:
    """Write the experiment's report and print its headline; returns report.md's path."""
    from orchestrator.driver.report import headline, write_report
    from orchestrator.driver.verdict import repeated_in_plans

    settings = _settings(cfg, plans) | {"experiment": experiment}
    if streaming is not None:
        settings["streaming"] = {k: streaming[k] for k in ("streamed", "capture_paused_s")}
    path, written = write_report(experiment_dir(cfg.output_dir, experiment), results=results,
                                 settings=settings, repeated=repeated_in_plans(plans),
                                 completions=_completions(cfg, plans, results))
    say(f"report: {path} (report.json, plots/*.png beside it)")
    for line in headline(written):
        say(line)
    return path


def _settings(cfg: Config, plans: list[CapturePlan]) -> dict:
    return {"teacher": cfg.teacher.model, "k": cfg.teacher.k, "mode": cfg.teacher.mode,
            "student": asdict(cfg.student), "train": asdict(cfg.train),
            "on_policy": asdict(cfg.on_policy),
            "captures": {p.label: {"dir": p.cfg.output_dir, "shards": len(p.manifest.shards),
                                   "rows": sum(s.rows for s in p.manifest.shards.values()),
                                   "tokens": sum(s.tokens for s in p.manifest.shards.values())}
                         for p in plans}}


def _completions(cfg: Config, plans: list[CapturePlan], results: dict) -> list[dict]:
    """The report's side-by-side greedy completions (`driver.completions`); [] without a
    held-out capture or with train.report_prompts 0."""
    from orchestrator.driver.completions import side_by_side
    from orchestrator.shards.plan import CaptureKind

    held = next((p for p in plans if p.kind is CaptureKind.HELDOUT), None)
    if held is None or cfg.train.report_prompts <= 0:
        return []
    return side_by_side(teacher=cfg.teacher.model,
                        students={label: r.model_dir for label, r in results.items()},
                        heldout_uri=held.cfg.output_dir, count=cfg.train.report_prompts,
                        prompt_tokens=cfg.train.bc_prompt_tokens,
                        new_tokens=cfg.train.report_new_tokens, num_gpus=cfg.teacher.num_gpus)
