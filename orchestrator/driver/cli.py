"""The `raydistill` command line.

    raydistill demo                         # build the demo teacher once, then capture with it
    raydistill capture CONFIG [--set teacher.k=32] [--fresh] [--repair]
    raydistill train CONFIG [--resume EXP]   # KD student + baselines on Ray Train, then a report
    raydistill run CONFIG [--fresh] [--resume EXP]   # capture and train together (streaming)
    raydistill inspect OUTPUT_DIR           # its captures, experiments and sweeps
    raydistill tune CONFIG [--space NAME] [--fresh] [--resume SWEEP]   # Ray Tune sweep
    raydistill serve RUN_DIR [--top N]      # Ray Serve: OpenAI-compatible routes for the winners
    raydistill query "text" [--model ID]    # ask a served student
    raydistill submit CONFIG --address http://HEAD:8265 [-- run|tune|capture ...]   # Ray Jobs
    raydistill jobs [list|logs ID|stop ID] --address http://HEAD:8265

User errors print one message (no traceback unless --debug) and exit with status 2; an error raised
inside a Ray worker (teacher actor, Train worker, Tune trial) is one of them, naming the original
type and text (--debug adds the worker's traceback). Commands that start Ray use the cluster
RAY_ADDRESS names, else one `ray start` runs on this machine, else a private one (--local-ray:
always private); see orchestrator/driver/cluster.py. Help texts and hints print the program the way the
user can call it (orchestrator/program.py: `.venv/bin/raydistill` when the venv is not
activated).
"""

from __future__ import annotations

import argparse
import os
import sys

from orchestrator.driver.cluster import PRIVATE_RAY_ENV
from orchestrator.errors import RaydistillError
from orchestrator.program import command_name


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the option and exits 2 otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _command(sub, name: str, *, text: str, examples: list[str]) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with its examples (`examples`: arguments after the
    command's name, `# comment` allowed)."""
    lines = "\n".join(f"  {command_name()} {name} {e}".rstrip() for e in examples)
    return sub.add_parser(name, help=text, description=text[:1].upper() + text[1:] + ".",
                          epilog=f"example{'s' if len(examples) > 1 else ''}:\n{lines}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _set_option(cmd: argparse.ArgumentParser, example: str, what: str = "a config field") -> None:
    cmd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help=f"override {what}, e.g. --set {example} (repeatable)")


def _local_ray_option(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--local-ray", action="store_true",
                     help=f"start a private Ray for this command even where `ray start` runs a "
                          f"cluster on this machine (the same as {PRIVATE_RAY_ENV}=private; "
                          "RAY_ADDRESS, when set, still names the cluster to use)")


def _parser() -> argparse.ArgumentParser:
    me = command_name()
    examples = (("demo", "the whole tour (~25 min on 2 CPUs the first time)"),
                ("run examples/quickstart.yaml", "capture and train together"),
                ("COMMAND --help", "a command's options and examples"))
    width = max(len(args) for args, _ in examples)
    p = argparse.ArgumentParser(
        prog=me, description="Distil LLMs on Ray.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + "\n".join(f"  {me} {args.ljust(width)}  # {what}"
                                          for args, what in examples))
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND",
                           help="what to do")

    cap = _command(sub, "capture", text="teacher actors write top-k soft labels into shards",
                   examples=["examples/quickstart.yaml --set teacher.k=32 "
                             "--set teacher.num_actors=2"])
    cap.add_argument("config", help="YAML run config")
    _set_option(cap, "teacher.k=32")
    cap.add_argument("--fresh", action="store_true",
                     help="delete this config's captures (only those) and capture from scratch")
    cap.add_argument("--repair", action="store_true",
                     help="verify every shard's checksum and recapture the bad ones")
    _local_ray_option(cap)

    for name, text, examples in (
            ("train", "train the KD student and baselines on a finished capture",
             ["examples/quickstart.yaml --set train.loss=jsd --set train.temperature=2"]),
            ("run", "capture and train together: students learn while teachers label",
             ["examples/quickstart.yaml",
              "examples/quickstart.yaml --resume exp-20261130-101500-ab12   # after Ctrl-C"])):
        cmd = _command(sub, name, text=text, examples=examples)
        cmd.add_argument("config", help="YAML run config")
        _set_option(cmd, "train.max_steps=200")
        cmd.add_argument("--resume", metavar="EXPERIMENT", default=None,
                         help="continue an interrupted experiment (its name under "
                              "output_dir/experiments) from its last checkpoints")
        if name == "run":
            cmd.add_argument("--fresh", action="store_true",
                             help="delete this config's captures (only those) and start over")
        _local_ray_option(cmd)

    demo = _command(sub, "demo", text="build the demo teacher (once) and run the quickstart",
                    examples=["", "--set train.max_steps=100   # shorter student training"])
    _set_option(demo, "train.max_steps=100", what="a field of examples/quickstart.yaml")
    demo.add_argument("--teacher-steps", type=_positive_int, default=None,
                      help="training steps of the demo teacher when it is first built "
                           "(default 1000, ~9 min on 2 idle CPUs; the same teacher on any load)")
    demo.add_argument("--teacher-minutes", type=float, default=None,
                      help="stop the demo teacher's training after this many minutes even if "
                           "its steps are not done (a weaker teacher; for quick tries)")
    demo.add_argument("--home", default=None,
                      help="where the demo teacher and data are cached "
                           "(default ~/.cache/raydistill)")
    demo.add_argument("--rebuild", action="store_true", help="retrain the cached demo teacher")
    demo.add_argument("--fresh", action="store_true",
                      help="recapture from scratch (e.g. after an upgrade changed the shard "
                           "format)")
    _local_ray_option(demo)

    tune = _command(sub, "tune", text="Ray Tune sweep of student sizes, temperatures and losses "
                                      "over one capture; leaderboard, Pareto plot, winners",
                    examples=["examples/quickstart.yaml --space sizes --set tune.num_samples=2"])
    tune.add_argument("config", help="YAML run config")
    tune.add_argument("--space", default=None,
                      help="search space: a name in tune_spaces/ (sizes, temperature, loss, "
                           "default), a YAML file, or omit for the config's tune.space")
    _set_option(tune, "tune.num_samples=2")
    tune.add_argument("--resume", metavar="SWEEP", default=None,
                      help="continue an interrupted sweep (its name under output_dir/sweeps)")
    _local_ray_option(tune)
    tune.add_argument("--fresh", action="store_true",
                      help="delete this config's captures (only those) and capture again "
                           "before the sweep")

    srv = _command(sub, "serve", text="host a run's winners behind OpenAI-compatible HTTP routes",
                   examples=["runs/quickstart --top 2 --set serve.port=8001"])
    srv.add_argument("run_dir", help="a sweep directory (winners.json), an experiment directory, "
                                     "a model directory, or an output_dir (its newest sweep)")
    srv.add_argument("--top", type=_positive_int, default=None,
                     help="serve the best N (default serve.top)")
    srv.add_argument("--config", default=None,
                     help="YAML config whose serve: section to use (default: RUN_DIR/config.yaml, "
                          "which a sweep writes)")
    _set_option(srv, "serve.port=8001", what="a serve setting")
    _local_ray_option(srv)

    qry = _command(sub, "query", text="send one completion request to a served student",
                   examples=['"def read_config(path):" --max-tokens 32 --stream'])
    qry.add_argument("prompt", help="the prompt text")
    qry.add_argument("--model", default=None, help="model id (default: the first one served)")
    qry.add_argument("--url", default="http://127.0.0.1:8000",
                     help="the server (default http://127.0.0.1:8000)")
    qry.add_argument("--max-tokens", type=_positive_int, default=64,
                     help="most tokens to generate (default 64; the server caps it at "
                          "serve.max_tokens)")
    qry.add_argument("--temperature", type=float, default=0.0,
                     help="sampling temperature (default 0: greedy, the same text every time)")
    qry.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    qry.add_argument("--api-key", default=None,
                     help="API key (default: the RAYDISTILL_API_KEY environment variable)")

    sbm = _command(sub, "submit", text="run `run`, `tune` or `capture` on a Ray cluster as a "
                                       "Ray Job (the project is the working_dir)",
                   examples=["examples/quickstart.yaml --address http://HEAD:8265 "
                             "-- tune --space sizes"])
    sbm.add_argument("config", help="YAML run config (inside the project directory)")
    sbm.add_argument("--address", default=None,
                     help="the cluster's dashboard, e.g. http://HEAD:8265 (default "
                          "RAY_JOB_ADDRESS / RAY_ADDRESS)")
    _set_option(sbm, "train.max_steps=200", what="a config field (checked here, applied in "
                                                   "the job)")
    sbm.add_argument("--no-wait", action="store_true",
                     help="print the job id and return instead of following the logs")
    sbm.add_argument("--pip", action="store_true",
                     help="install the project's dependencies in the job's runtime_env (on a "
                          "venv-based cluster Ray first copies the venv: ~40 s, GBs of disk); "
                          "default: the cluster's Python environment")
    sbm.epilog = ("Put the command the job runs after --, e.g. `-- tune --space sizes` (default: "
                  "`-- run`).\n\n" + sbm.epilog)

    jobs = _command(sub, "jobs", text="list, follow or stop Ray Jobs on a cluster",
                    examples=["list --address http://HEAD:8265",
                              "logs raydistill-tune-20261130-101500-ab12 "
                              "--address http://HEAD:8265"])
    jobs.add_argument("action", nargs="?", default="list", choices=["list", "logs", "stop"],
                      help="list the jobs (default), follow one job's logs, or stop it")
    jobs.add_argument("job_id", nargs="?", default=None,
                      help="the job (for logs and stop), as `submit` and `jobs list` print it")
    jobs.add_argument("--address", default=None, help="http://HEAD:8265 (default RAY_JOB_ADDRESS)")

    ins = _command(sub, "inspect", text="what an output_dir holds: every capture (main, "
                                        "held-out, behaviour-cloning samples, of every config "
                                        "that captured there), experiments and sweeps",
                   examples=["runs/quickstart"])
    ins.add_argument("output_dir", help="a run's output_dir (the config's output_dir: a local "
                                        "path or s3://…)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    job_command: list[str] = []
    if "--" in argv:  # `submit ... -- COMMAND ARGS`: what the job runs
        cut = argv.index("--")
        argv, job_command = argv[:cut], argv[cut + 1:]
    args = _parser().parse_args(argv)
    if job_command and args.command != "submit":
        _parser().error(f"only `{command_name()} submit` takes a command after --")
    if getattr(args, "local_ray", False):
        os.environ[PRIVATE_RAY_ENV] = "private"  # read by orchestrator.driver.cluster.connect()
    try:
        if args.command == "capture":
            from orchestrator.config import load_config
            from orchestrator.driver.pipeline import capture

            cfg = load_config(args.config, args.set)
            manifest = capture(cfg, fresh=args.fresh, repair=args.repair)
            return 0 if manifest.complete else 1
        if args.command in ("train", "run"):
            from orchestrator.driver import pipeline
            from orchestrator.config import load_config

            cfg = load_config(args.config, args.set)
            if args.command == "train":
                pipeline.train(cfg, resume=args.resume)
            else:
                pipeline.run(cfg, fresh=args.fresh, resume=args.resume)
            return 0
        if args.command == "demo":
            from orchestrator.driver.demo import run_demo

            return run_demo(overrides=args.set, teacher_steps=args.teacher_steps,
                            teacher_minutes=args.teacher_minutes, home=args.home,
                            rebuild=args.rebuild, fresh=args.fresh)
        if args.command == "tune":
            from orchestrator.driver import pipeline
            from orchestrator.config import load_config

            overrides = list(args.set)
            if args.space is not None:
                overrides.append(f"tune.space={args.space}")
            cfg = load_config(args.config, overrides)
            pipeline.tune(cfg, resume=args.resume, fresh=args.fresh)
            return 0
        if args.command == "serve":
            from orchestrator.config import load_serve_config
            from orchestrator.driver.serving import run_server

            config = args.config
            if config is None and os.path.isfile(os.path.join(args.run_dir, "config.yaml")):
                config = os.path.join(args.run_dir, "config.yaml")  # a sweep's own settings
            return run_server(args.run_dir, load_serve_config(config, args.set), top=args.top)
        if args.command == "query":
            from serve.client import query

            return query(args.prompt, url=args.url, model=args.model, max_tokens=args.max_tokens,
                         temperature=args.temperature, stream=args.stream, api_key=args.api_key)
        if args.command == "submit":
            from orchestrator.driver.jobs import submit

            return submit(args.config, address=args.address, command=job_command,
                          overrides=args.set, follow=not args.no_wait, pip=args.pip)
        if args.command == "jobs":
            from orchestrator.driver.jobs import jobs

            return jobs(args.action, job_id=args.job_id, address=args.address)
        if args.command == "inspect":
            from orchestrator.driver.inspect import describe

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
