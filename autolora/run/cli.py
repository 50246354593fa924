"""The ``autolora`` command: ``train CONFIG.yaml [key=value ...]``, ``export RUN_DIR``, ``report RUN_DIR``,
``evaluate RUN_DIR`` (the dev score through the exported PEFT adapter), ``generate RUN_DIR --prompt TEXT``
(causal-LM runs).

User mistakes (a bad config, missing files, ...) print one ``error:`` line and exit with status 2;
nothing else is caught.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from autolora.errors import AutoLoRAError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autolora", description="Find a LoRA rank per layer; export PEFT adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="search -> prune -> retrain -> export -> evaluate, from a YAML config")
    train.add_argument("config", type=Path, help="a YAML run config (see configs/)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. search.max_rank=16 fit.epochs=2")
    export = sub.add_parser("export", help="export a run's newest search checkpoint as a PEFT adapter")
    export.add_argument("run_dir", type=Path)
    export.add_argument(
        "--out", type=Path, default=None, help="target folder (default: RUN_DIR/adapter-from-checkpoint)"
    )
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty target folder")
    export.add_argument("--merged", action="store_true", help="write the base model with the adapters merged in")
    export.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="prune at this cut (x the median module top score; default 0.1) instead",
    )
    export.add_argument("--target-rank", type=int, default=None, help="prune to this average rank instead")
    report = sub.add_parser("report", help="write report.md and PNG plots of the ranks into RUN_DIR")
    report.add_argument("run_dir", type=Path)
    evaluate = sub.add_parser(
        "evaluate", help="rescore a run's dev data through its exported adapter, loaded with stock PEFT"
    )
    evaluate.add_argument("run_dir", type=Path)
    evaluate.add_argument("--adapter", type=Path, default=None, help="an adapter folder (default: RUN_DIR/adapter)")
    _add_generate(sub)
    return parser


# the Python arguments `autolora export` passes its flags to, as the flags are spelt
_FLAGS = {"overwrite=True": "--overwrite", "target_rank=": "--target-rank ", "threshold=": "--threshold "}


def _flag_words(message: str) -> str:
    for python, flag in _FLAGS.items():
        message = re.sub(rf"(?<![\w.]){re.escape(python)}", flag, message)
    return message


def _add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="greedy generation through a causal-LM run's exported PEFT adapter")
    gen.add_argument("run_dir", type=Path)
    gen.add_argument("--prompt", required=True, help="formatted with the run's data.prompt_template")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--raw", action="store_true", help="use the prompt as given, without the template")


def _generate(args) -> None:
    from autolora.run import causal

    print(causal.generate(args.run_dir, args.prompt, args.max_new_tokens, raw=args.raw))


def _evaluate(args) -> None:
    from autolora.run.evaluate import evaluate_run

    result = evaluate_run(args.run_dir, args.adapter)
    print(json.dumps(result, indent=1))
    versus = (
        ""
        if result["reported"] is None
        else f" (autolora train reported {result['reported']:.6f}, |diff| {result['abs_diff']:.2e})"
    )
    name = "loss" if result["metric"] == "dev_loss" else result["metric"]
    print(f"dev {name} through the PEFT adapter {result['adapter']}: {result['dev']:.6f}{versus}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            from autolora.run import pipeline
            from autolora.run.config import load_config
            from autolora.run.report import write_report

            cfg, _ = load_config(args.config, args.overrides)
            metrics = pipeline.train(cfg)
            report = write_report(cfg.output_dir)
            print(json.dumps(metrics, indent=1))
            print(f"run folder: {cfg.output_dir} (report: {report})")
            base = metrics.get("baseline")  # classification / regression runs carry one
            versus = f" ({base['name']}: {base['dev']:.4f})" if base else ""
            name = "loss" if metrics["metric"] == "dev_loss" else metrics["metric"]
            print(f"dev {name}: {metrics['dev']:.4f}{versus}")
            for warning in metrics.get("warnings", []):
                print(f"autolora train: warning: {warning}", file=sys.stderr)
        elif args.command == "export":
            from autolora.run import pipeline

            try:
                out = pipeline.export(
                    args.run_dir,
                    args.out,
                    overwrite=args.overwrite,
                    merged=args.merged,
                    threshold=args.threshold,
                    target_rank=args.target_rank,
                )
            except AutoLoRAError as e:
                raise type(e)(_flag_words(str(e))) from None
            print(f"exported to {out}")
        elif args.command == "evaluate":
            _evaluate(args)
        elif args.command == "generate":
            _generate(args)
        else:
            from autolora.run.report import write_report

            print(f"wrote {write_report(args.run_dir)}")
    except AutoLoRAError as e:
        print(f"autolora {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
