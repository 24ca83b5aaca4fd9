#!/usr/bin/env python
"""Evaluate a saved or Hub model: ``python recipes/evaluate.py --model outputs/demo/model``.

Without ``--dataset`` it rebuilds the run's own test split from ``<model>/../run_config.yaml``; with one, it
evaluates on that dataset's ``--split``. Prints overall / balanced / many / medium / few / ECE (percent) and,
with ``--json FILE``, writes the metrics with the per-class accuracies (the file's folder must exist).

A dataset's class names must be the model's (``id2label``), in any order and possibly fewer of them; otherwise
the evaluation is refused unless ``--label-map`` maps dataset names to model names or ``--ignore-label-names``
compares class ids. Only safetensors weights are loaded. Errors are one ``error: ...`` line (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse prints the usage and its message: one line instead
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved model folder or a Hub model id")
    parser.add_argument("--dataset", default=None, help="dataset to evaluate on (default: the run's own test split)")
    parser.add_argument("--split", default="test", help="split name (default: test)")
    parser.add_argument("--label-column", default=None, help="label column (default: the ClassLabel column)")
    parser.add_argument("--label-map", default=None,
                        help="YAML mapping 'dataset class name: model class name' (inline or a file) for a dataset "
                             "whose class names differ from the model's")
    parser.add_argument("--ignore-label-names", action="store_true",
                        help="compare dataset and model classes by id, whatever their names")
    parser.add_argument("--batch-size", type=_positive_int, default=128, help="images per forward pass (default: 128)")
    parser.add_argument("--trust-remote-code", action="store_true", help="load the model's own code from its folder")
    parser.add_argument("--json", default=None, help="also write the metrics to this JSON file (folder must exist)")
    return parser


def _check_json_target(path: str | None) -> None:
    """Refuse an unwritable ``--json`` before the evaluation, not after it."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"--json {path} is a folder; name a file")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"--json: folder {target.parent} does not exist")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error already printed as one line (2)
        return int(done.code or 0)
    from pih2t_hub._atomic import atomic_write_text
    from pih2t_hub.evaluation.label_names import read_label_map
    from pih2t_hub.evaluation.saved_model import evaluate_saved_model
    from pih2t_hub.training.predict import format_table, summarize

    try:
        _check_json_target(args.json)
        label_map = read_label_map(args.label_map) if args.label_map is not None else None
        metrics = evaluate_saved_model(args.model, dataset=args.dataset, split=args.split,
                                       label_column=args.label_column, batch_size=args.batch_size,
                                       trust_remote_code=args.trust_remote_code, label_map=label_map,
                                       ignore_label_names=args.ignore_label_names)
    except (FileNotFoundError, NotADirectoryError, ValueError, TypeError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(format_table({Path(args.model).name or args.model: summarize(metrics)}))
    if args.json:
        record = {**summarize(metrics), "per_class": [float(a) for a in metrics["per_class"]]}
        atomic_write_text(args.json, json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
