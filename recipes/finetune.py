#!/usr/bin/env python
"""Long-tailed fine-tuning of a pretrained backbone: ``accelerate launch recipes/finetune.py --backbone vit_base``.

With no arguments it runs the offline demo (pretrained EfficientNet-Lite0, MNIST-LT, H2T on cached features) in
about a minute on 2 CPU cores. ``--config recipes/configs/NAME.yaml`` loads a recipe; any flag overrides it.
The fully resolved config is written to ``<output-dir>/run_config.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from pih2t_hub.training.config import RunConfig
from pih2t_hub.training.run import run

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_UNSET = object()  # "flag not given" (None is a real value: `--max-per-class none`)


def _optional(cast):
    """Parse a value, with ``none`` meaning ``None`` (e.g. no head-size cap, an already long-tailed dataset)."""
    return lambda s: None if s.lower() in ("none", "null") else cast(s)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="recipe YAML (a path, or a name in recipes/configs/)")
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("loss_kwargs", "method_kwargs"):
            parser.add_argument(flag, type=str, default=_UNSET, help="YAML mapping of extra arguments (loss or method hyper-parameters)")
            continue
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
        if "bool" in kind:
            parser.add_argument(flag, type=_bool, nargs="?", const=True, default=_UNSET)
        elif "int" in kind and "float" not in kind:
            parser.add_argument(flag, type=_optional(int), default=_UNSET)
        elif "float" in kind:
            parser.add_argument(flag, type=_optional(float), default=_UNSET)
        else:
            parser.add_argument(flag, type=_optional(str) if "None" in kind else str, default=_UNSET)
    return parser


def resolve_config(argv: list[str] | None = None) -> RunConfig:
    """Recipe file (if any), then CLI overrides, into one validated RunConfig."""
    import yaml

    args = build_parser().parse_args(argv)
    data: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.exists():
            path = CONFIG_DIR / f"{args.config.removesuffix('.yaml')}.yaml"
        if not path.exists():
            raise SystemExit(f"recipe {args.config!r} not found (looked in {CONFIG_DIR})")
        data = RunConfig.from_yaml(path).to_dict()
    for f in dataclasses.fields(RunConfig):
        value = getattr(args, f.name)
        if value is _UNSET:
            continue
        if f.name in ("loss_kwargs", "method_kwargs"):
            value = yaml.safe_load(value) or {}
        data[f.name] = value
    return RunConfig.from_dict(data).validate()


def main(argv: list[str] | None = None) -> int:
    cfg = resolve_config(argv)
    try:
        run(cfg)
    except KeyboardInterrupt:
        print("interrupted; a checkpoint was written — rerun with --resume to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
