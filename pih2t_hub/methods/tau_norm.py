"""τ-normalisation (Kang et al., ICLR 2020): no training; class weight vectors divided by ‖w_c‖^τ."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import Method, Stage2Context, register_method
from .decoupling import select_tau, tau_normalize


@dataclass(frozen=True)
class TauNormParams:
    """``keep_bias``: keep the stage-1 head's bias (the official code drops it)."""

    keep_bias: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.keep_bias, bool):
            raise ValueError(f"keep_bias must be true or false, got {self.keep_bias!r}")


@register_method("tau_norm")
class TauNorm(Method):
    paper = "Kang et al., Decoupling Representation and Classifier, ICLR 2020"
    summary = "no training: W_c / ‖W_c‖^τ with τ chosen on validation; the bias is dropped as in the official code"
    needs_features = True
    Params = TauNormParams

    def finalize(self, trained: nn.Module, ctx: Stage2Context) -> nn.Module:
        if not isinstance(trained, nn.Linear):
            raise ValueError(f"τ-norm needs a linear head, got {type(trained).__name__}")
        keep_bias = self.params.keep_bias
        x, y = ctx.val_features
        bias = trained.bias.detach() if keep_bias and trained.bias is not None else None
        sel = select_tau(trained.weight.detach(), bias, x.float(), y)
        head = nn.Linear(trained.in_features, trained.out_features, bias=bias is not None)
        head = head.to(trained.weight.device)
        head.weight.data.copy_(tau_normalize(trained.weight.detach(), sel.tau))
        if bias is not None:
            head.bias.data.copy_(bias)
        ctx.results["tau"] = sel.tau
        return head

    def export(self, model: nn.Module, head: nn.Module, ctx: Stage2Context) -> nn.Module:
        model = super().export(model, head, ctx)
        model.config.head_bias = head.bias is not None  # the saved head is rebuilt without a bias
        return model
