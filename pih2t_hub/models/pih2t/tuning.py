"""Lightweight fine-tuning modules that travel with checkpoints: AdaptFormer and VPT for ViT-family backbones.

LIFT (Shi et al., ICML 2024) keeps a pretrained backbone frozen and trains a small module inside it, plus the head.
Two of its kinds change the forward pass and must therefore be part of the saved model's own code (this file is
copied next to every checkpoint, like its siblings; it needs torch only, never ``peft`` or pih2t_hub):

* **AdaptFormer**: in every block a branch parallel to the MLP, ``scale · up(ReLU(down(LN(x))))`` of the residual
  stream ``x`` entering the block's second norm, added to the MLP's output. Down-projection Kaiming-normal, the
  up-projection and both biases zero, ``scale`` 1: the adapted backbone starts equal to the pretrained one.
* **VPT (deep)**: at every block, ``P`` learnable prompt tokens are appended after the sequence and their outputs
  dropped after the block, so every block sees fresh prompts and the backbone's own tokens (and every block's
  output in the hidden states) keep their shape; transformers' first hidden state, recorded as block 0's input,
  shows block 0's prompts appended. Uniform init in ``±sqrt(6 / (3·patch_area + d))``, LIFT's.

The other two kinds leave no module behind: LoRA (trained through Hugging Face ``peft``) is merged into the weights
at save, and BitFit only changes biases and norm parameters. ``PIH2TConfig.tuning`` records the kind and its sizes
for all four (the card reads it); only ``adaptformer`` and ``vpt`` rebuild modules here.

The modules are attached with forward hooks on the backbone's own blocks, so the backbone's weights keep their
names (a checkpoint's backbone tensors are the pretrained model's keys) and no timm / transformers code is copied.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

#: Every kind, and the kinds whose modules live in the saved model (the others leave plain backbone weights).
TUNING_KINDS = ("lora", "adaptformer", "bitfit", "vpt")
MODULE_KINDS = ("adaptformer", "vpt")

_NORM_NAMES = ("norm2", "layernorm_after")  # the norm before the MLP: timm Block, DINOv2 / HF ViT, DeiT
_MLP_NAMES = ("mlp", "output")  # the MLP (transformers < 5: ``output`` adds the residual itself)


def lift_rank(num_classes: int, num_blocks: int) -> int:
    """LIFT's bottleneck when none is given: ``2 ** max(0, floor(log2(C / (2 L))))`` for C classes, L blocks."""
    ratio = num_classes / (2 * max(int(num_blocks), 1))
    return 2 ** max(0, math.floor(math.log2(ratio))) if ratio > 0 else 1


class AdaptFormer(nn.Module):
    """``scale · up(ReLU(down(LN(x))))``: LIFT's AdaptFormer branch; zero at initialisation."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.down_proj = nn.Linear(dim, bottleneck)
        self.up_proj = nn.Linear(bottleneck, dim)
        self.scale = nn.Parameter(torch.ones(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.ln.reset_parameters()
        nn.init.kaiming_normal_(self.down_proj.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down_proj.bias)
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.up_proj.bias)
        nn.init.ones_(self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up_proj(torch.relu(self.down_proj(self.ln(x)))) * self.scale

    # Hooks (bound methods, so a deep copy of the model hooks the copied branch): the norm before the MLP hands
    # over the residual stream it receives, the MLP's output gets the branch of it added, within one forward.
    def before_norm(self, module: nn.Module, args: tuple) -> None:
        self._residual = args[0]

    def after_mlp(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        residual, self._residual = getattr(self, "_residual", None), None
        if residual is None:
            raise RuntimeError("AdaptFormer: the block's MLP ran without its norm (unexpected block structure)")
        return output + self(residual)


class Prompts(nn.Module):
    """``length`` learnable tokens of width ``dim`` (one block's deep-VPT prompts)."""

    def __init__(self, length: int, dim: int, patch_area: int) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.empty(length, dim))
        self.bound = math.sqrt(6.0 / float(3 * patch_area + dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.prompt, -self.bound, self.bound)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([tokens, self.prompt.to(tokens.dtype).expand(tokens.shape[0], -1, -1)], dim=1)

    # Hooks on the block (bound methods, see AdaptFormer): prompts appended before it, their outputs dropped after.
    def before_block(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (self(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self(kwargs["hidden_states"])}

    def after_block(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        length = self.prompt.shape[0]
        if isinstance(output, tuple):
            return (output[0][:, :-length], *output[1:])
        return output[:, :-length]


# ---------------------------------------------------------------------------------------------- ViT structure


def vit_blocks(model: nn.Module) -> list[nn.Module] | None:
    """The transformer blocks of a timm ViT (``blocks``) or an HF encoder (``layers`` / ``encoder.layer``) when
    each has a norm before its MLP and an MLP; ``None`` for any other backbone (a CNN)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "patch_embed"):
        blocks = getattr(model, "layers", None)
        if blocks is None:
            blocks = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        return None
    ok = all(_child(b, _NORM_NAMES) is not None and _child(b, _MLP_NAMES) is not None for b in blocks)
    return list(blocks) if ok else None


def _child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return child
    return None


def vit_sizes(model: nn.Module) -> tuple[int, int]:
    """``(embedding width, patch area)`` of a timm or HF ViT."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "hidden_size"):
        patch = config.patch_size
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        return int(config.hidden_size), int(patch[0] * patch[1])
    proj = model.patch_embed.proj
    return int(model.embed_dim), int(proj.kernel_size[0] * proj.kernel_size[1])


def require_vit(model: nn.Module, kind: str) -> list[nn.Module]:
    blocks = vit_blocks(model)
    if blocks is None:
        raise ValueError(f"--peft {kind} applies to ViT-family backbones (transformer blocks with an MLP); "
                         f"{type(model).__name__} has none: use lora or bitfit")
    return blocks


class TuningModules(nn.Module):
    """The AdaptFormer branches or VPT prompts of one backbone, one per block, wired in with forward hooks.

    Owned by ``PIH2TModel`` (keys ``pih2t.tuning.blocks.<i>.*``): the backbone's own keys are untouched.
    """

    def __init__(self, backbone_model: nn.Module, spec: dict[str, Any]) -> None:
        super().__init__()
        kind = spec["kind"]
        blocks = require_vit(backbone_model, kind)
        dim, patch_area = vit_sizes(backbone_model)
        self.kind = kind
        self.handles: list[Any] = []
        if kind == "adaptformer":
            self.blocks = nn.ModuleList(AdaptFormer(dim, int(spec["rank"])) for _ in blocks)
            for block, adapter in zip(blocks, self.blocks):
                self.handles.append(_child(block, _NORM_NAMES).register_forward_pre_hook(adapter.before_norm))
                self.handles.append(_child(block, _MLP_NAMES).register_forward_hook(adapter.after_mlp))
        elif kind == "vpt":
            length = int(spec["prompts"])
            self.blocks = nn.ModuleList(Prompts(length, dim, patch_area) for _ in blocks)
            for block, prompts in zip(blocks, self.blocks):
                self.handles.append(block.register_forward_pre_hook(prompts.before_block, with_kwargs=True))
                # prepended: hooks that record a block's output (transformers' hidden states) see it without prompts
                self.handles.append(block.register_forward_hook(prompts.after_block, with_kwargs=True, prepend=True))
        else:
            raise ValueError(f"tuning kind {kind!r} leaves no module in the model; modules exist for {MODULE_KINDS}")

    def remove(self) -> None:
        """Detach the hooks (the backbone runs as the pretrained one again)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


def build_tuning(backbone_model: nn.Module, spec: dict[str, Any] | None) -> TuningModules | None:
    """The modules ``spec`` (``PIH2TConfig.tuning``) puts into the backbone, or ``None`` (no tuning, or a kind
    that left plain weights: merged LoRA, BitFit)."""
    if not spec or spec.get("kind") not in MODULE_KINDS:
        return None
    return TuningModules(backbone_model, spec)


def bitfit_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """BitFit's trainable set: every bias, and the affine parameters of every normalisation layer."""
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    norm_params = {id(p) for m in module.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)}
    try:  # timm's own norm layers (LayerNorm2d, BatchNormAct2d, ...) subclass these; RMSNorm-style ones too
        from torch.nn import RMSNorm

        norm_params |= {id(p) for m in module.modules() if isinstance(m, RMSNorm) for p in m.parameters(recurse=False)}
    except ImportError:  # pragma: no cover - torch < 2.4
        pass
    return [(n, p) for n, p in module.named_parameters() if n.endswith("bias") or id(p) in norm_params]


__all__ = ["AdaptFormer", "Prompts", "TuningModules", "TUNING_KINDS", "MODULE_KINDS", "bitfit_parameters",
           "build_tuning", "lift_rank", "require_vit", "vit_blocks", "vit_sizes"]
