#!/usr/bin/env python
"""Long-tailed fine-tuning of a pretrained backbone: ``accelerate launch recipes/finetune.py --backbone vit_base``.

With no arguments it runs the offline demo (pretrained EfficientNet-Lite0, MNIST-LT, H2T on cached features) on
the CPU; the README gives the time it took there. ``--config recipes/configs/NAME.yaml`` loads a recipe; any flag overrides it.
The output directory is locked for the run; the model folder, ``results.json`` and the recorded
``run_config.yaml`` are replaced together at the end. Errors are one ``error: ...`` line (exit code 2);
``--debug`` shows the traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pih2t_hub.training import cli

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def build_parser():
    """The CLI's parser (``HfArgumentParser`` over ``RunConfig``, grouped)."""
    return cli.build_parser(__doc__)


def resolve_config(argv: list[str] | None = None):
    """Recipe file (if any), then the flags given, into one validated ``RunConfig``."""
    return cli.resolve_config(argv, CONFIG_DIR)


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, CONFIG_DIR, __doc__)


if __name__ == "__main__":
    sys.exit(main())
