"""Masked autoregressive flow (MAF) used by DLSA's FlowGMM (METHODS.md §3.4).

The flow maps a frozen feature vector x ∈ ℝ^D to a latent u ∈ ℝ^D with a tractable log|det J|, so that a Gaussian
mixture in latent space becomes a proper density over features. DLSA uses ``MADE → BN → MADE → BN`` with the
sequential variable order, the second MADE using the reversed order so that every dimension is conditioned on every
other one after two blocks.

Conventions (all from the official code's behaviour, re-written here):

* A MADE block outputs a shift ``m(x)`` and a log-scale ``log a(x)``; the forward (density) direction is
  ``u = (x - m(x)) * exp(-log a(x))`` with per-dimension log|det| ``-log a(x)``. Output ``i`` depends only on inputs
  of strictly smaller degree, so the Jacobian is triangular in the degree order and the per-dimension terms are exact.
* The BatchNorm flow layer (RealNVP) uses batch mean and *unbiased* batch variance in training mode and running
  statistics (momentum 0.9 on the old value) in eval mode. Its log|det| treats the statistics as constants, the
  usual convention; the exact per-sample Jacobian therefore only holds in eval mode.

Every layer returns ``(y, log_abs_det)`` with ``log_abs_det`` of shape ``(B, D)`` (per dimension), and the
:class:`MAF` sums them over layers; :meth:`MAF.forward` returns the per-sample total ``(B,)``.

Parameters are initialised like :class:`torch.nn.Linear` (uniform ±1/√fan_in) but from a passed
:class:`torch.Generator`, so that construction never touches the global RNG.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["sequential_degrees", "made_masks", "MaskedLinear", "MADE", "BatchNormFlow", "MAF"]


def _uniform_(tensor: torch.Tensor, bound: float, generator: torch.Generator | None) -> None:
    """Fill ``tensor`` with U(-bound, bound) from ``generator`` (CPU draw, then copy, so any device works)."""
    with torch.no_grad():
        values = torch.empty(tensor.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        tensor.copy_(values.to(device=tensor.device, dtype=tensor.dtype))


def sequential_degrees(
    dim: int, hidden_size: int, n_hidden: int, input_degrees: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Degrees of every layer of a MADE with the sequential order.

    Returns ``[input, hidden_1, ..., hidden_{n_hidden+1}, output]``:
    inputs get ``0..D-1`` (or ``input_degrees``, e.g. the flipped degrees of the previous block), hidden unit ``j``
    gets ``j mod (D-1)`` and output ``i`` gets ``input_degree_i - 1``. With the masks of :func:`made_masks` output ``i``
    can only see inputs of strictly smaller degree.
    """
    if dim < 2:
        raise ValueError(f"a MADE needs at least 2 input dimensions, got {dim}")
    if hidden_size < 1 or n_hidden < 0:
        raise ValueError(f"need hidden_size >= 1 and n_hidden >= 0, got {hidden_size}, {n_hidden}")
    if input_degrees is None:
        input_degrees = torch.arange(dim)
    elif sorted(input_degrees.tolist()) != list(range(dim)):
        raise ValueError("input_degrees must be a permutation of 0..dim-1")
    hidden = torch.arange(hidden_size) % (dim - 1)
    return [input_degrees.clone()] + [hidden.clone() for _ in range(n_hidden + 1)] + [input_degrees - 1]


def made_masks(degrees: list[torch.Tensor]) -> list[torch.Tensor]:
    """Binary masks ``(out, in)`` between consecutive layers: unit ``k`` may see unit ``i`` iff deg_k >= deg_i."""
    return [(d_out[:, None] >= d_in[None, :]).float() for d_in, d_out in zip(degrees[:-1], degrees[1:])]


class MaskedLinear(nn.Module):
    """Linear layer whose dense weight is multiplied by a fixed 0/1 mask (the autoregressive wiring)."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor, generator: torch.Generator | None = None):
        super().__init__()
        if mask.shape != (out_features, in_features):
            raise ValueError(f"mask shape {tuple(mask.shape)} != ({out_features}, {in_features})")
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.register_buffer("mask", mask.float())
        bound = 1.0 / math.sqrt(in_features)
        _uniform_(self.weight, bound, generator)
        _uniform_(self.bias, bound, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """One masked autoencoder block: ``D → H``, ReLU, (``H → H``, ReLU) × n_hidden, ``H → 2D`` → (m, log a)."""

    def __init__(
        self,
        dim: int,
        hidden_size: int | None = None,
        n_hidden: int = 1,
        input_degrees: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        hidden_size = dim if hidden_size is None else hidden_size
        degrees = sequential_degrees(dim, hidden_size, n_hidden, input_degrees)
        masks = made_masks(degrees)
        self.dim = dim
        self.register_buffer("input_degrees", degrees[0])
        layers: list[nn.Module] = [MaskedLinear(dim, hidden_size, masks[0], generator)]
        for mask in masks[1:-1]:
            layers += [nn.ReLU(), MaskedLinear(hidden_size, hidden_size, mask, generator)]
        # m and log a share the output mask, hence it is tiled twice.
        layers += [nn.ReLU(), MaskedLinear(hidden_size, 2 * dim, masks[-1].repeat(2, 1), generator)]
        self.net = nn.Sequential(*layers)

    def _shift_logscale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, log_a = self.net(x).chunk(2, dim=1)
        return m, log_a

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, log_a = self._shift_logscale(x)
        return (x - m) * torch.exp(-log_a), -log_a

    @torch.no_grad()
    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        """Invert dimension by dimension in degree order (D network passes; slow, used for checks and sampling)."""
        x = torch.zeros_like(u)
        for i in torch.argsort(self.input_degrees).tolist():
            m, log_a = self._shift_logscale(x)
            x[:, i] = u[:, i] * torch.exp(log_a[:, i]) + m[:, i]
        return x


class BatchNormFlow(nn.Module):
    """RealNVP batch normalisation as an invertible layer with learnable log γ and β (both start at 0)."""

    def __init__(self, dim: int, momentum: float = 0.9, eps: float = 1e-5):
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.log_gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self._batch_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def _stats(self, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.training:
            return self.running_mean, self.running_var
        if x is None:  # inverse in train mode: reuse the statistics of the last forward batch
            if self._batch_stats is None:
                raise RuntimeError("BatchNormFlow.inverse in training mode needs a preceding forward pass")
            return self._batch_stats
        if x.shape[0] < 2:
            raise ValueError("BatchNormFlow in training mode needs a batch of at least 2 samples")
        mean, var = x.mean(0), x.var(0, unbiased=True)
        with torch.no_grad():
            self.running_mean.mul_(self.momentum).add_(mean.detach() * (1 - self.momentum))
            self.running_var.mul_(self.momentum).add_(var.detach() * (1 - self.momentum))
        self._batch_stats = (mean.detach(), var.detach())
        return mean, var

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, var = self._stats(x)
        y = torch.exp(self.log_gamma) * (x - mean) / torch.sqrt(var + self.eps) + self.beta
        log_det = self.log_gamma - 0.5 * torch.log(var + self.eps)
        return y, log_det.expand_as(x)

    @torch.no_grad()
    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        mean, var = self._stats(None)
        return (y - self.beta) * torch.exp(-self.log_gamma) * torch.sqrt(var + self.eps) + mean


class MAF(nn.Module):
    """Stack of ``n_blocks`` × (MADE [+ BatchNormFlow]); each MADE uses the reversed order of the previous one."""

    def __init__(
        self,
        dim: int,
        n_blocks: int = 2,
        hidden_size: int | None = None,
        n_hidden: int = 1,
        batch_norm: bool = True,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
        self.dim = dim
        layers: list[nn.Module] = []
        degrees = None
        for _ in range(n_blocks):
            made = MADE(dim, hidden_size, n_hidden, degrees, generator)
            layers.append(made)
            degrees = made.input_degrees.flip(0)
            if batch_norm:
                layers.append(BatchNormFlow(dim))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the latent ``u`` (B, D) and the total log|det J| per sample (B,)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (B, {self.dim}), got {tuple(x.shape)}")
        total = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, log_det = layer(x)
            total = total + log_det.sum(1)
        return x, total

    @torch.no_grad()
    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            u = layer.inverse(u)
        return u
