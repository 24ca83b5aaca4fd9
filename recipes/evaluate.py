#!/usr/bin/env python
"""Evaluate a saved or Hub model: ``python recipes/evaluate.py --model outputs/demo/model``.

Without ``--dataset`` it rebuilds the run's own test split from ``<model>/../run_config.yaml``; with one, it
evaluates on that dataset's ``--split``. Prints overall / balanced / many / medium / few / ECE (percent) and,
with ``--json FILE``, writes the metrics with the per-class accuracies.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved model folder or a Hub model id")
    parser.add_argument("--dataset", default=None, help="dataset to evaluate on (default: the run's own test split)")
    parser.add_argument("--split", default="test", help="split name (default: test)")
    parser.add_argument("--label-column", default=None, help="label column (default: the ClassLabel column)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default: 128)")
    parser.add_argument("--trust-remote-code", action="store_true", help="load the model's own code from its folder")
    parser.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pih2t_hub.evaluation.saved_model import evaluate_saved_model
    from pih2t_hub.training.predict import format_table, summarize

    try:
        metrics = evaluate_saved_model(args.model, dataset=args.dataset, split=args.split,
                                       label_column=args.label_column, batch_size=args.batch_size,
                                       trust_remote_code=args.trust_remote_code)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table({Path(args.model).name or args.model: summarize(metrics)}))
    if args.json:
        record = {**summarize(metrics), "per_class": [float(a) for a in metrics["per_class"]]}
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
