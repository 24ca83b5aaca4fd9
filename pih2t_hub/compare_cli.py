"""The comparison's command line: ``HfArgumentParser`` over :class:`RunConfig` and :class:`CompareConfig`.

The same machinery as a run's (:mod:`pih2t_hub.training.cli`): the same flag names, types, choices and groups for
the data, backbone and stage-1 settings, ``--config`` recipes, and every configuration or data error as one
``error: ...`` line (exit code 2) before any extraction. ``--help`` and those checks import no torch. The run
fields the comparison decides itself (the method, stage-2 values, ...) are not flags of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

from .compare_config import FIXED_RUN_VALUES, RUN_FIELDS_SET_BY_COMPARISON, CompareConfig
from .training import cli
from .training.config import RunConfig

__all__ = ["build_parser", "resolve_configs", "main"]

DESCRIPTION = """Which long-tailed method on my data, with my backbone, and how much does it buy me?

Every method gets the same Optuna budget; each trial is scored by stratified K-fold cross-validation on the pooled
train and validation rows (--cv-folds, --cv-repeats); the chosen configuration and the published recipe are
retrained for every seed and evaluated on test once. Interrupted, it resumes from the Optuna storage and ends with
the same table. Errors are one ``error: ...`` line (exit code 2); ``--debug`` shows the traceback."""
OUTPUT_DIR = "outputs/compare"
CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipes" / "configs"


def build_parser(description: str | None = DESCRIPTION) -> argparse.ArgumentParser:
    """The comparison's parser: its own group first, then the run's data / model / stages / training / output."""
    parser = cli.build_parser(description, exclude=RUN_FIELDS_SET_BY_COMPARISON, extra=(CompareConfig,))
    parser.set_defaults(output_dir=OUTPUT_DIR)
    from ._names import method_names  # the names alone: no torch

    for action in parser._actions:
        if "--methods" in action.option_strings:
            action.metavar = "NAME[,NAME...]"
            action.help = f"methods to compare, from {', '.join(method_names())}; none: every built-in method"
    return parser


def _methods(value: list[str | None] | None) -> list[str] | None:
    """``--methods ce,crt`` and ``--methods ce crt`` alike."""
    names = [n.strip() for v in value or [] if v for n in v.split(",") if n.strip()]
    return names or None


def resolve_configs(argv: Sequence[str] | None = None,
                    config_dir: Path | None = CONFIG_DIR) -> tuple[RunConfig, CompareConfig]:
    """Recipe file (if any), then the flags given, into a validated RunConfig and CompareConfig (a flag given
    overrides the recipe, as for a run)."""
    run_names = [f.name for f in dataclasses.fields(RunConfig) if f.name not in RUN_FIELDS_SET_BY_COMPARISON]
    namespace = argparse.Namespace(**{n: cli._UNSET for n in run_names})  # argparse fills only what is absent
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv), namespace=namespace)
    run = {"output_dir": OUTPUT_DIR, **(cli._recipe(args.config, config_dir) if args.config else {})}
    run.update({n: getattr(args, n) for n in run_names if getattr(args, n) is not cli._UNSET})
    run = {k: v for k, v in run.items() if k not in RUN_FIELDS_SET_BY_COMPARISON}
    cc = CompareConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CompareConfig)})
    cc.methods = _methods(cc.methods)
    return RunConfig.from_dict({**run, **FIXED_RUN_VALUES}).validate(), cc.validate()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, then :func:`pih2t_hub.compare.compare` (which checks names, budget, folds, dataset path, backbone and
    storage before any extraction). Exit code 0, 2 (a configuration or data error), 130 (Ctrl-C), 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        build_parser().print_help()
        return 0
    debug = "--debug" in argv
    try:
        base, cc = resolve_configs(argv)
        from .compare import compare, format_report  # the heavy imports only once the flags parsed

        report = compare(base, cc)  # checks the configs and the machine first, once
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the Optuna storage", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one line by default; the traceback is one flag away
        return cli.report_error(err, debug)
    print(format_report(report))
    print(f"report, plot and best model ({report['best']}) written to {base.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
