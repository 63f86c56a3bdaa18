"""The `raydistill` command line.

    raydistill demo                         # build the demo teacher once, then capture with it
    raydistill capture CONFIG [--set teacher.k=32] [--fresh] [--repair]
    raydistill train CONFIG [--resume EXP]   # KD student + baselines on Ray Train, then a report
    raydistill run CONFIG [--fresh] [--resume EXP]   # capture and train together (streaming)
    raydistill inspect OUTPUT_DIR           # what a capture holds
    raydistill tune CONFIG [--space NAME] [--resume SWEEP]   # Ray Tune sweep over one capture
    raydistill serve RUN_DIR [--top N]      # Ray Serve: OpenAI-compatible routes for the winners
    raydistill query "text" [--model ID]    # ask a served student
    raydistill submit CONFIG --address http://HEAD:8265 [-- run|tune|capture ...]   # Ray Jobs
    raydistill jobs [list|logs ID|stop ID] --address http://HEAD:8265

User errors print one message (no traceback unless --debug) and exit with status 2; an error raised
inside a Ray worker (teacher actor, Train worker, Tune trial) is one of them, naming the original
type and text (--debug adds the worker's traceback).
"""

from __future__ import annotations

import argparse
import os
import sys

from orchestrator.errors import RaydistillError


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the option and exits 2 otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raydistill", description="Distil LLMs on Ray.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    cap = sub.add_parser("capture", help="teacher actors write top-k soft labels into shards")
    cap.add_argument("config", help="YAML run config")
    cap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set teacher.k=32 (repeatable)")
    cap.add_argument("--fresh", action="store_true",
                     help="delete what output_dir holds and capture from scratch")
    cap.add_argument("--repair", action="store_true",
                     help="verify every shard's checksum and recapture the bad ones")

    for name, text in (("train", "train the KD student and baselines on a finished capture"),
                       ("run", "capture and train together: students learn while teachers label")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("config", help="YAML run config")
        cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config field, e.g. --set train.max_steps=200")
        cmd.add_argument("--resume", metavar="EXPERIMENT", default=None,
                         help="continue an interrupted experiment (its name under "
                              "output_dir/experiments) from its last checkpoints")
        if name == "run":
            cmd.add_argument("--fresh", action="store_true",
                             help="delete the previous capture in output_dir and start over")

    demo = sub.add_parser("demo", help="build the demo teacher (once) and run the quickstart")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    demo.add_argument("--teacher-steps", type=_positive_int, default=None,
                      help="training steps of the demo teacher when it is first built "
                           "(default 1000, ~9 min on 2 idle CPUs; the same teacher on any load)")
    demo.add_argument("--teacher-minutes", type=float, default=None,
                      help="stop the demo teacher's training after this many minutes even if "
                           "its steps are not done (a weaker teacher; for quick tries)")
    demo.add_argument("--home", default=None,
                      help="where the demo teacher and data are cached (default ~/.cache/raydistill)")
    demo.add_argument("--rebuild", action="store_true", help="retrain the cached demo teacher")
    demo.add_argument("--fresh", action="store_true",
                      help="recapture from scratch (e.g. after an upgrade changed the shard format)")

    tune = sub.add_parser("tune", help="Ray Tune sweep of student sizes, temperatures and losses "
                                       "over one capture; leaderboard, Pareto plot, winners")
    tune.add_argument("config", help="YAML run config")
    tune.add_argument("--space", default=None,
                      help="search space: a name in tune_spaces/ (sizes, temperature, loss, "
                           "default), a YAML file, or omit for the config's tune.space")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field, e.g. --set tune.num_samples=2")
    tune.add_argument("--resume", metavar="SWEEP", default=None,
                      help="continue an interrupted sweep (its name under output_dir/sweeps)")

    srv = sub.add_parser("serve", help="host a run's winners behind OpenAI-compatible HTTP routes")
    srv.add_argument("run_dir", help="a sweep directory (winners.json), an experiment directory, "
                                     "a model directory, or an output_dir (its newest sweep)")
    srv.add_argument("--top", type=_positive_int, default=None,
                     help="serve the best N (default serve.top)")
    srv.add_argument("--config", default=None,
                     help="YAML config whose serve: section to use (default: RUN_DIR/config.yaml, "
                          "which a sweep writes)")
    srv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a serve setting, e.g. --set serve.port=8001")

    qry = sub.add_parser("query", help="send one completion request to a served student")
    qry.add_argument("prompt", help="the prompt text")
    qry.add_argument("--model", default=None, help="model id (default: the first one served)")
    qry.add_argument("--url", default="http://127.0.0.1:8000",
                     help="the server (default http://127.0.0.1:8000)")
    qry.add_argument("--max-tokens", type=_positive_int, default=64)
    qry.add_argument("--temperature", type=float, default=0.0)
    qry.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    qry.add_argument("--api-key", default=None,
                     help="API key (default: the RAYDISTILL_API_KEY environment variable)")

    sbm = sub.add_parser("submit", help="run `run`, `tune` or `capture` on a Ray cluster as a "
                                        "Ray Job (the project is the working_dir)")
    sbm.add_argument("config", help="YAML run config (inside the project directory)")
    sbm.add_argument("--address", default=None,
                     help="the cluster's dashboard, e.g. http://HEAD:8265 (default "
                          "RAY_JOB_ADDRESS / RAY_ADDRESS)")
    sbm.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sbm.add_argument("--no-wait", action="store_true",
                     help="print the job id and return instead of following the logs")
    sbm.add_argument("--pip", action="store_true",
                     help="install the project's dependencies in the job's runtime_env (on a "
                          "venv-based cluster Ray first copies the venv: ~40 s, GBs of disk); "
                          "default: the cluster's Python environment")
    sbm.epilog = ("Put the raydistill command to run after --, e.g. `raydistill submit cfg.yaml "
                  "--address http://HEAD:8265 -- tune --space sizes` (default: run).")

    jobs = sub.add_parser("jobs", help="list, follow or stop Ray Jobs on a cluster")
    jobs.add_argument("action", nargs="?", default="list", choices=["list", "logs", "stop"])
    jobs.add_argument("job_id", nargs="?", default=None)
    jobs.add_argument("--address", default=None, help="http://HEAD:8265 (default RAY_JOB_ADDRESS)")

    ins = sub.add_parser("inspect", help="summarise a capture's manifest and shard metadata")
    ins.add_argument("output_dir")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    job_command: list[str] = []
    if "--" in argv:  # `submit ... -- COMMAND ARGS`: what the job runs
        cut = argv.index("--")
        argv, job_command = argv[:cut], argv[cut + 1:]
    args = _parser().parse_args(argv)
    if job_command and args.command != "submit":
        _parser().error("only `raydistill submit` takes a command after --")
    try:
        if args.command == "capture":
            from orchestrator.config import load_config
            from orchestrator.pipeline import capture

            cfg = load_config(args.config, args.set)
            manifest = capture(cfg, fresh=args.fresh, repair=args.repair)
            return 0 if manifest.complete else 1
        if args.command in ("train", "run"):
            from orchestrator import pipeline
            from orchestrator.config import load_config

            cfg = load_config(args.config, args.set)
            if args.command == "train":
                pipeline.train(cfg, resume=args.resume)
            else:
                pipeline.run(cfg, fresh=args.fresh, resume=args.resume)
            return 0
        if args.command == "demo":
            from orchestrator.demo import run_demo

            return run_demo(overrides=args.set, teacher_steps=args.teacher_steps,
                            teacher_minutes=args.teacher_minutes, home=args.home,
                            rebuild=args.rebuild, fresh=args.fresh)
        if args.command == "tune":
            from orchestrator import pipeline
            from orchestrator.config import load_config

            overrides = list(args.set)
            if args.space is not None:
                overrides.append(f"tune.space={args.space}")
            cfg = load_config(args.config, overrides)
            pipeline.tune(cfg, resume=args.resume)
            return 0
        if args.command == "serve":
            from orchestrator.config import load_serve_config
            from serve.app import run_server

            config = args.config
            if config is None and os.path.isfile(os.path.join(args.run_dir, "config.yaml")):
                config = os.path.join(args.run_dir, "config.yaml")  # a sweep's own settings
            return run_server(args.run_dir, load_serve_config(config, args.set), top=args.top)
        if args.command == "query":
            from serve.client import query

            return query(args.prompt, url=args.url, model=args.model, max_tokens=args.max_tokens,
                         temperature=args.temperature, stream=args.stream, api_key=args.api_key)
        if args.command == "submit":
            from orchestrator.jobs import submit

            return submit(args.config, address=args.address, command=job_command,
                          overrides=args.set, follow=not args.no_wait, pip=args.pip)
        if args.command == "jobs":
            from orchestrator.jobs import jobs

            return jobs(args.action, job_id=args.job_id, address=args.address)
        if args.command == "inspect":
            from orchestrator.inspect import describe

            print(describe(args.output_dir))
            return 0
    except RaydistillError as e:
        if args.debug:
            _print_worker_traceback(e)
            raise
        print(f"raydistill: error: {e}", file=sys.stderr)
        return 2
    return 2


def _print_worker_traceback(error: BaseException) -> None:
    """--debug: the traceback of a Ray worker's error, which only its RemoteError carries."""
    from orchestrator.errors import RemoteError

    seen = error
    while seen is not None and not isinstance(seen, RemoteError):
        seen = seen.__cause__
    if seen is not None and seen.traceback:
        print(f"the Ray worker's traceback:\n{seen.traceback}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
