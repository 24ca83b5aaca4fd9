"""The command line of a run: ``transformers.HfArgumentParser`` over :class:`RunConfig`, and one-line errors.

Flags come from the config's fields (help, group and choices are field metadata, defaults are the field defaults),
grouped as data / model / method / stages / training / output / hub. ``--config`` loads a recipe YAML; a flag
given on the command line overrides it (a flag is "given" when argparse sets it, so ``--seed 0`` overrides a
recipe's ``seed: 5`` even though 0 is the default).

:func:`main` reports every configuration or data error as ``error: ...`` on one line with exit code 2, before
the heavy imports and any extraction or training where it can be known early; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

from transformers import HfArgumentParser

from .config import GROUPS, ConfigError, RunConfig
from .interrupt import Terminated, terminate_like_ctrl_c

__all__ = ["UsageError", "add_config_flags", "build_parser", "check_combinations", "report_error", "resolve_config",
           "main", "USER_ERRORS"]

_UNSET = object()  # "flag not given" (None is a real value: `--max-per-class none`)
_RENAMED = {"--epochs": "--stage1-epochs / --stage2-epochs", "--lr": "--stage1-lr / --stage2-lr"}


class UsageError(ConfigError):
    """A command line argparse cannot parse (unknown flag, invalid value, missing recipe)."""


def _none_or(cast: Callable[[str], Any]) -> Callable[[str], Any]:
    """``none``/``null`` mean ``None`` (no per-class cap, an already long-tailed dataset, the method's recipe)."""
    def parse(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null") else cast(text)

    parse.__name__ = getattr(cast, "__name__", "value")  # argparse names the type in "invalid int value"
    return parse


def _yaml_mapping(text: str) -> dict[str, Any]:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{{tau: 1.5}}', got {text!r}")
    return value


class _Group:
    """Adapts the arguments ``HfArgumentParser`` derives from a field: dashed flag only, ``none`` for optional
    values, YAML for mappings."""

    def __init__(self, group: Any, optional: bool) -> None:
        self.group, self.optional = group, optional

    def add_argument(self, *flags: str, **kwargs: Any) -> Any:
        flags = tuple(f for f in flags if "_" not in f) or flags
        if kwargs.get("action") == "store_false":  # HfArgumentParser's --no-<flag> for a flag that defaults to true
            kwargs["help"], kwargs["default"] = f"same as --{flags[0][5:]} false", argparse.SUPPRESS
        kind = kwargs.get("type")
        if typing.get_origin(kind) is dict or kind is dict:
            kwargs["type"], kwargs["metavar"] = _yaml_mapping, "YAML"
        elif self.optional and kind in (int, float, str):
            kwargs["type"] = _none_or(kind)
        return self.group.add_argument(*flags, **kwargs)


class _Parser(HfArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # argparse prints usage and exits; we want one line
        for old, new in _RENAMED.items():
            if old in message.split():
                message += f" ({old} is now {new})"
        raise UsageError(f"{message} (see --help)")


def _optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def build_parser(description: str | None = None, exclude: typing.Collection[str] = (),
                 extra: typing.Sequence[type] = ()) -> HfArgumentParser:
    """The parser: ``--config``, ``--debug`` and one flag per :class:`RunConfig` field (but ``exclude``), in groups;
    then one per field of each ``extra`` dataclass (e.g. the comparison's own), in the groups they name."""
    parser = _Parser([], description=description, formatter_class=lambda prog: argparse.ArgumentDefaultsHelpFormatter(
        prog, max_help_position=36, width=118))
    parser.add_argument("--config", help="recipe YAML: a path, or a name in recipes/configs/ (flags override it)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    names = dict.fromkeys([*(f.metadata["group"] for c in extra for f in dataclasses.fields(c)), *GROUPS])
    groups = {name: parser.add_argument_group(name) for name in names}  # the extra groups first in --help
    add_config_flags(parser, RunConfig, groups, exclude)
    for config in extra:
        add_config_flags(parser, config, groups)
    _list_registered_methods(parser)
    return parser


def add_config_flags(parser: HfArgumentParser, config: type, groups: dict[str, Any],
                     exclude: typing.Collection[str] = ()) -> None:
    """One flag per field of the dataclass ``config`` (but ``exclude``), in the argument group its ``group``
    metadata names: what ``HfArgumentParser`` derives from the field, adapted by :class:`_Group`."""
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        if f.name in exclude:
            continue
        field = copy.copy(f)  # HfArgumentParser resolves .type in place: leave the dataclass's own fields alone
        field.type = hints[f.name]
        field.metadata = types.MappingProxyType({k: v for k, v in f.metadata.items() if k in ("help", "choices")})
        HfArgumentParser._parse_dataclass_field(_Group(groups[f.metadata["group"]], _optional(field.type)), field)


def _list_registered_methods(parser: argparse.ArgumentParser) -> None:
    """``--method``'s help names every method: the built-ins, and plug-ins once the methods package is imported
    (the names alone, so building the parser imports no torch)."""
    from .._names import method_names

    for action in parser._actions:
        if "--method" in action.option_strings:
            action.help = f"long-tail method: one of {', '.join(method_names())} (docs/methods.md)"


def _recipe(name: str, config_dir: Path | None) -> dict[str, Any]:
    path = Path(name)
    if not path.exists() and config_dir is not None:
        path = config_dir / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        where = f" (looked in {config_dir})" if config_dir is not None else ""
        raise UsageError(f"recipe {name!r} not found{where}")
    return RunConfig.from_yaml(path).to_dict()


def resolve_config(argv: Sequence[str] | None = None, config_dir: Path | None = None) -> RunConfig:
    """Recipe file (if any), then the flags given on the command line, into one validated RunConfig."""
    names = [f.name for f in dataclasses.fields(RunConfig)]
    namespace = argparse.Namespace(**{n: _UNSET for n in names})  # argparse fills only what is absent
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv), namespace=namespace)
    data = _recipe(args.config, config_dir) if args.config else {}
    given = {n for n in names if getattr(args, n) is not _UNSET}
    data.update({n: getattr(args, n) for n in given})
    cfg = RunConfig.from_dict(data).validate()
    for warning in check_combinations(cfg, given):
        print(f"warning: {warning}", file=sys.stderr)
    return cfg


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


#: Flags that only say something about the start model, which ``--init-from`` replaces by the saved one.
_START_MODEL = ("backbone", "pretrained", "head_type")


def check_combinations(cfg: RunConfig, given: set[str]) -> list[str]:
    """Refuse flags given on the command line that would do nothing in this combination; return warnings.

    A flag that a run ignores leaves the user believing something ran that did not, so it is refused
    (:class:`UsageError`): ``--stage2-*`` values with ``--stage 1``, ``--resume-strict`` without ``--resume``,
    ``--mixup-alpha`` when no end-to-end stage 1 runs, ``--backbone`` / ``--pretrained`` / ``--head-type`` with
    ``--init-from``. Only flags given count: a recipe's value, or a default, is not the user's claim. A combination
    that runs but is rarely meant is a warning: ``--stage 2`` without ``--init-from`` trains stage 2 on a head that
    stage 1 never trained.
    """
    if cfg.stage == "1":
        extra = [n for n in sorted(given) if n.startswith("stage2_") and n != "stage2_mode"]
        if extra:
            raise UsageError(f"{', '.join(map(_flag, extra))} does nothing with --stage 1 (stage 2 does not run); "
                             "drop it, or use --stage both")
    _check_stage2_head(cfg, given)
    if "resume_strict" in given and cfg.resume_strict and not cfg.resume:
        raise UsageError("--resume-strict does nothing without --resume; add --resume, or drop it")
    finetune = cfg.stage1_mode == "finetune" and cfg.stage in ("1", "both")
    if "mixup_alpha" in given and cfg.mixup_alpha > 0 and not finetune:
        raise UsageError("--mixup-alpha applies to stage 1 with --stage1-mode finetune only (a linear probe on "
                         "cached features, or --stage 2, mixes no images)")
    ignored = [n for n in _START_MODEL if n in given]
    if cfg.init_from and ignored:
        raise UsageError(f"{', '.join(map(_flag, ignored))} does nothing with --init-from (the saved model "
                         f"{cfg.init_from} carries its own backbone, weights and head); drop it")
    if cfg.stage == "2" and not cfg.init_from:
        return ["--stage 2 without --init-from trains stage 2 on a classifier head that stage 1 never trained "
                "(pass --init-from <a stage-1 run>/model, or use --stage both)"]
    return []


#: Stage-2 optimiser flags: meaningless for a method that trains no stage-2 head.
_STAGE2_TRAINING = ("stage2_epochs", "stage2_lr", "stage2_batch_size", "stage2_weight_decay")


def _check_stage2_head(cfg: RunConfig, given: set[str]) -> None:
    """``--stage2-lr`` and the like with a method whose stage 2 is a post-hoc step (τ-norm, NCM, post-hoc logit
    adjustment, DLSA): refused, since the run would silently train nothing with them. Imports the method (and
    torch) only when such a flag was given."""
    extra = [n for n in _STAGE2_TRAINING if n in given]
    if not extra or cfg.stage == "1":
        return
    from ..methods import get_method

    if get_method(cfg.method).recipe is None:
        raise UsageError(f"{', '.join(map(_flag, extra))} does nothing with --method {cfg.method} (its stage 2 "
                         "trains no head: it is a post-hoc step on the stage-1 model); drop it")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, KeyError):
        text = f"missing key {text}"
    return text


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the command line's or the machine's, not a bug: one line, exit code 2. All light modules."""
    from ..registry import HubUnavailableError
    from .checkpoint import CorruptCheckpointError
    from .lock import OutputLockedError, StaleLockError

    return (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError, OutputLockedError,
            StaleLockError, CorruptCheckpointError, HubUnavailableError)


USER_ERRORS = _user_errors()


def main(argv: Sequence[str] | None = None, config_dir: Path | None = None,
         description: str | None = None) -> int:
    """Parse, check, lock, run. Returns the exit code: 0, 2 (a configuration or data error), 130 (Ctrl-C),
    143 (SIGTERM), 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        build_parser(description).print_help()
        return 0
    debug = "--debug" in argv
    try:
        from .preflight import preflight

        cfg = preflight(resolve_config(argv, config_dir))
        with terminate_like_ctrl_c():
            from .run import run_checked  # the heavy imports (datasets, accelerate) only once the config is good

            run_checked(cfg)  # the recipe resolved, the output guarded, the steps walked: once each
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (Terminated): exit codes 130 and 143, as a shell reports
        terminated = isinstance(err, Terminated)
        print(f"{'terminated (SIGTERM)' if terminated else 'interrupted'}: rerun with --resume to continue from the "
              "newest checkpoint", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as err:  # noqa: BLE001 - one line by default; the traceback is one flag away
        return report_error(err, debug)
    return 0


def report_error(err: Exception, debug: bool) -> int:
    """An error as one ``error:`` line on stderr and its exit code: 2 for the command line's or the machine's
    (:data:`USER_ERRORS`), 1 for anything else (a bug: its type is named). ``--debug`` re-raises it instead."""
    if debug:
        raise err
    if isinstance(err, USER_ERRORS):
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    print(f"error: {type(err).__name__}: {_one_line(err)} (rerun with --debug for the traceback)", file=sys.stderr)
    return 1

