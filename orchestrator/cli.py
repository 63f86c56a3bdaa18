"""The `raydistill` command line.

    raydistill demo                         # build the demo teacher once, then capture with it
    raydistill capture CONFIG [--set teacher.k=32] [--fresh] [--repair]
    raydistill train CONFIG [--resume EXP]   # KD student + baselines on Ray Train, then a report
    raydistill run CONFIG [--fresh] [--resume EXP]   # capture and train together (streaming)
    raydistill inspect OUTPUT_DIR           # what a capture holds

User errors print one message (no traceback unless --debug) and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from orchestrator.errors import RaydistillError


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
    demo.add_argument("--teacher-minutes", type=float, default=8.0,
                      help="training budget of the demo teacher when it is first built")
    demo.add_argument("--home", default=None,
                      help="where the demo teacher and data are cached (default ~/.cache/raydistill)")
    demo.add_argument("--rebuild", action="store_true", help="retrain the cached demo teacher")
    demo.add_argument("--fresh", action="store_true",
                      help="recapture from scratch (e.g. after an upgrade changed the shard format)")

    ins = sub.add_parser("inspect", help="summarise a capture's manifest and shard metadata")
    ins.add_argument("output_dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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

            return run_demo(overrides=args.set, teacher_minutes=args.teacher_minutes,
                            home=args.home, rebuild=args.rebuild, fresh=args.fresh)
        if args.command == "inspect":
            from orchestrator.inspect import describe

            print(describe(args.output_dir))
            return 0
    except RaydistillError as e:
        if args.debug:
            raise
        print(f"raydistill: error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
