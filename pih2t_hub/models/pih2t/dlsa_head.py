"""DLSA as one classifier head: flows, routing thresholds and both classifier kinds, on pooled features.

DLSA (Xu et al., ECCV 2022) classifies a pooled feature vector x in up to L+1 ways: at depth d = 1..L a FlowGMM
(a masked autoregressive flow with K fixed Gaussian components in latent space) scores log p_d(x); if it reaches
the threshold τ_d learnt on the training set, the cluster-aided classifier of depth d (which also sees the class
histogram of x's cluster) gives the logits, otherwise x goes on; what is left after depth L goes to the regular
classifier. :class:`DLSAHead` holds all of it as ordinary parameters and buffers, so a fitted DLSA model is saved
as safetensors inside a ``PIH2TForImageClassification`` and rebuilt from a plain JSON dict of sizes
(:meth:`DLSAHead.head_config`). Fitting lives in ``pih2t_hub.methods.dlsa``; this file only needs torch, because it
travels with saved checkpoints as remote code. See docs/methods.md (DLSA) for the method and its deviations.

Flow conventions (the official code's behaviour, re-written here):

* A MADE block outputs a shift ``m(x)`` and a log-scale ``log a(x)``; the forward (density) direction is
  ``u = (x - m(x)) * exp(-log a(x))`` with per-dimension log|det| ``-log a(x)``. Output ``i`` depends only on inputs
  of strictly smaller degree, so the Jacobian is triangular in the degree order and the per-dimension terms are exact.
  ``MADE → BN → MADE → BN`` with the sequential order, the second MADE reversed, conditions every dimension on
  every other one.
* The BatchNorm flow layer (RealNVP) uses batch mean and *unbiased* batch variance in training mode and running
  statistics (momentum 0.9 on the old value) in eval mode. Its log|det| treats the statistics as constants, the
  usual convention; the exact per-sample Jacobian therefore only holds in eval mode.
* Every layer returns ``(y, log_abs_det)`` with ``log_abs_det`` of shape ``(B, D)`` (per dimension); :class:`MAF`
  sums them over layers and dimensions.
* Parameters are initialised like :class:`torch.nn.Linear` (uniform ±1/√fan_in) but from a passed
  :class:`torch.Generator`, so that construction never touches the global RNG.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "sequential_degrees",
    "made_masks",
    "BlockPlan",
    "MaskedLinear",
    "MADE",
    "BatchNormFlow",
    "MAF",
    "FlowGMM",
    "DualHead",
    "DLSAHead",
]


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


def _boxes(mask: torch.Tensor, cuts: list[int], segments: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """For each row chunk ``cuts[i]..cuts[i+1]`` of ``mask``: the column range [lo, hi) holding all its non-zeros,
    one range per equal column segment (none where a segment is empty)."""
    n_cols = mask.shape[1]
    seg_cuts = [n_cols * k // segments for k in range(segments + 1)]
    out = []
    for r0, r1 in zip(cuts[:-1], cuts[1:]):
        ranges = []
        for s0, s1 in zip(seg_cuts[:-1], seg_cuts[1:]):
            cols = mask[r0:r1, s0:s1].any(0).nonzero().squeeze(1)
            if cols.numel():
                ranges.append((s0 + int(cols[0]), s0 + int(cols[-1]) + 1))
        out.append((r0, r1, ranges))
    return out


class BlockPlan:
    """Which blocks of a masked product hold non-zeros, so that only those are multiplied (exact for any mask).

    The rows are cut into ``num_blocks`` chunks in their stored order; each chunk multiplies only the column range
    that holds its non-zeros (its bounding box). The input gradient is cut the same way along the columns. The
    masked weight is zero outside the mask, so a box may hold zeros without changing the result; how much is
    skipped depends on the mask. A MADE mask (unit k sees unit i iff deg_k >= deg_i) with the sequential degrees
    is close to triangular in the stored order, except for columns every row sees (the hidden unit of degree 0
    at the end): those ``extra`` columns are multiplied separately when that shrinks the boxes. A mask made of
    two identical row halves (MADE's output layer, for m and log a) gets ``num_blocks`` row chunks per half and
    its column boxes per half.
    ``work`` is the fraction of the dense product still computed.
    """

    def __init__(self, mask: torch.Tensor, num_blocks: int):
        nz = mask != 0
        n_rows, n_cols = nz.shape
        live = nz.any(1)
        full = (nz | ~live[:, None]).all(0) & live.any()  # columns seen by every row that sees anything
        halves = 2 if n_rows % 2 == 0 and n_rows > 1 and torch.equal(nz[: n_rows // 2], nz[n_rows // 2:]) else 1
        best = None
        for extra in (torch.zeros_like(full), full):
            main = nz & ~extra[None, :]
            half = n_rows // halves  # row chunks never straddle the two halves
            row_cuts = torch.cat([torch.linspace(0, half, num_blocks + 1).round().long() + h * half
                                  for h in range(halves)]).unique().tolist()
            col_cuts = torch.linspace(0, n_cols, num_blocks + 1).round().long().unique().tolist()
            rows = _boxes(main, row_cuts, 1)
            cols = _boxes(main.T, col_cuts, halves)
            area = sum((r1 - r0) * (hi - lo) for r0, r1, rs in rows for lo, hi in rs)
            area += int(extra.sum()) * n_rows
            if best is None or area < best[0]:
                best = (area, extra, main, rows, cols)
        area, extra, main, self.row_blocks, self.col_blocks = best
        self.extra = extra.nonzero().squeeze(1)
        self.main_mask = main.to(mask.dtype)
        self.extra_mask = mask[:, self.extra]
        self.work = area / max(n_rows * n_cols, 1)


class _BlockMatmul(torch.autograd.Function):
    """``F.linear(x, weight * mask, bias)`` multiplying only the blocks of a :class:`BlockPlan` (same result)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
        w_main = weight * plan.main_mask
        parts = []
        for r0, r1, ranges in plan.row_blocks:
            out = bias[r0:r1].expand(x.shape[0], r1 - r0)
            for lo, hi in ranges:
                out = torch.addmm(out, x[:, lo:hi], w_main[r0:r1, lo:hi].T)
            parts.append(out)
        y = torch.cat(parts, dim=1)
        w_extra = None
        if plan.extra.numel():
            w_extra = weight[:, plan.extra] * plan.extra_mask
            y.addmm_(x[:, plan.extra], w_extra.T)
        ctx.save_for_backward(x, w_main, w_extra)
        ctx.plan = plan
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w_main, w_extra = ctx.saved_tensors
        plan: BlockPlan = ctx.plan
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            parts = []
            for c0, c1, ranges in plan.col_blocks:
                out = grad.new_zeros(grad.shape[0], c1 - c0) if not ranges else None
                for lo, hi in ranges:
                    term = grad[:, lo:hi] @ w_main[lo:hi, c0:c1]
                    out = term if out is None else out.add_(term)
                parts.append(out)
            grad_x = torch.cat(parts, dim=1)
            if w_extra is not None:
                grad_x.index_add_(1, plan.extra, grad @ w_extra)
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros_like(w_main)
            for r0, r1, ranges in plan.row_blocks:
                for lo, hi in ranges:
                    torch.mm(grad[:, r0:r1].T, x[:, lo:hi], out=grad_w[r0:r1, lo:hi])
            grad_w.mul_(plan.main_mask)
            if w_extra is not None:
                grad_w[:, plan.extra] = (grad.T @ x[:, plan.extra]) * plan.extra_mask
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b, None


class MaskedLinear(nn.Module):
    """Linear layer whose dense weight is multiplied by a fixed 0/1 mask (the autoregressive wiring).

    ``block_matmul`` (default on): in training (gradients enabled), when skipping the mask's empty blocks saves at
    least a fifth of the products (every MADE mask at the default widths), only the blocks holding non-zeros are
    multiplied (:class:`BlockPlan`), forward and backward; inference and export use the dense product. The
    result is the dense masked product up to float rounding; parameters, buffers and saved models are unchanged.
    """

    block_matmul: bool = True
    num_blocks: int | None = None  #: blocks of the plan; None = one per 128 rows or columns (fewer), at most 16

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
        self._plan_cache: tuple[Any, BlockPlan] | None = None

    def plan(self) -> BlockPlan | None:
        """The block plan of this mask, or None when the dense product is used (kept per device, dtype and size)."""
        if not self.block_matmul:
            return None
        blocks = self.num_blocks or max(1, min(16, min(self.mask.shape) // 128))
        key = (self.mask.device, self.mask.dtype, blocks)
        if self._plan_cache is None or self._plan_cache[0] != key:
            self._plan_cache = (key, BlockPlan(self.mask, blocks))
        plan = self._plan_cache[1]
        return plan if plan.work <= 0.8 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the block path serves training (where the cost is); inference and export keep the plain dense product
        plan = self.plan() if torch.is_grad_enabled() and self.weight.requires_grad else None
        if plan is None:
            return F.linear(x, self.weight * self.mask, self.bias)
        return _BlockMatmul.apply(x, self.weight, self.bias, plan)


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


def _equal_chunks(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, ...]:
    if x.shape[0] % groups:
        raise ValueError(f"a batch of {x.shape[0]} samples cannot be split into {groups} equal groups")
    return x.chunk(groups)


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

    def forward(self, x: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``groups`` > 1 (training mode): the batch is that many equal batches, normalised one after the other.

        Exactly as separate calls in that order (own batch statistics, running statistics updated per group).
        """
        if groups > 1 and self.training:
            parts = [self(chunk) for chunk in _equal_chunks(x, groups)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
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

    def forward(self, x: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the latent ``u`` (B, D) and the total log|det J| per sample (B,).

        ``groups``: the batch is that many equal batches (BatchNorm statistics per group, see
        :meth:`BatchNormFlow.forward`); the MADEs act per sample, so this equals one call per group.
        """
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (B, {self.dim}), got {tuple(x.shape)}")
        total = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, log_det = layer(x, groups) if isinstance(layer, BatchNormFlow) else layer(x)
            total = total + log_det.sum(1)
        return x, total

    @torch.no_grad()
    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            u = layer.inverse(u)
        return u


class FlowGMM(nn.Module):
    """MAF flow plus K fixed isotropic Gaussian components with uniform weights.

    The means are drawn once from N(0, σ² I) and kept as a buffer (only the flow learns), so that

        log p(x | k) = -D/2 · log 2π - ½ ‖T(x) - μ_k‖² + log|det J_T(x)|          (B, K)
        log p(x)     = logsumexp_k log p(x | k) - log K                              (B,)

    and a sample's cluster is ``argmax_k log p(x | k)``, the nearest mean in latent space.
    """

    def __init__(
        self,
        dim: int,
        num_clusters: int,
        *,
        n_blocks: int = 2,
        hidden_size: int | None = None,
        n_hidden: int = 1,
        batch_norm: bool = True,
        mean_std: float = 0.05,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
        if mean_std < 0:
            raise ValueError(f"mean_std must be >= 0, got {mean_std}")
        self.dim = dim
        self.num_clusters = num_clusters
        self.flow = MAF(dim, n_blocks, hidden_size, n_hidden, batch_norm, generator)
        means = torch.randn(num_clusters, dim, generator=generator) * mean_std
        self.register_buffer("means", means)

    def component_log_prob(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """log p(x | k) for every component, shape (B, K) (``groups``: see :meth:`MAF.forward`)."""
        u, log_det = self.flow(x, groups)
        # ‖u - μ‖² expanded so that no (B, K, D) tensor is built (K = 500, D = 2048 in the released configs).
        sq = (u * u).sum(1, keepdim=True) - 2.0 * u @ self.means.T + (self.means * self.means).sum(1)[None, :]
        sq = sq.clamp_min(0.0)
        return -0.5 * self.dim * math.log(2 * math.pi) - 0.5 * sq + log_det[:, None]

    def forward(self, x: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (component log-probs (B, K), log-likelihood log p(x) (B,))."""
        comp = self.component_log_prob(x, groups)
        return comp, self.log_prob_from_components(comp)

    def log_prob_from_components(self, comp: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(comp, dim=1) - math.log(self.num_clusters)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)[1]

    def posterior(self, x: torch.Tensor) -> torch.Tensor:
        """q(k | x): softmax over components of log p(x | k) (uniform mixture weights cancel)."""
        return torch.softmax(self.component_log_prob(x), dim=1)

    @torch.no_grad()
    def score(self, x: torch.Tensor, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode log-likelihood (N,) and cluster (N,) in chunks; restores the previous train/eval mode."""
        was_training = self.training
        self.eval()
        llh, clusters = [], []
        for start in range(0, x.shape[0], batch_size):
            comp, lp = self(x[start : start + batch_size])
            llh.append(lp)
            clusters.append(comp.argmax(1))
        self.train(was_training)
        if not llh:
            return x.new_zeros(0), torch.zeros(0, dtype=torch.long, device=x.device)
        return torch.cat(llh), torch.cat(clusters)


class DualHead(nn.Module):
    """``logits = f_A(x) + f_B(z)``: the shape of both DLSA classifiers.

    Cluster-aided (``XZP``): z = [x ; π_{k(x)}] (features and the cluster prior); regular: z = x, which makes it one
    linear layer with two parameter copies, as in the official code. ``kind="cosine"``: each term is a cosine
    classifier without bias, ``s · v/(1+‖v‖) · w_c/‖w_c‖``.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        num_classes: int,
        kind: str = "linear",
        scale: float = 16.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if kind not in ("linear", "cosine"):
            raise ValueError(f"kind must be 'linear' or 'cosine', got {kind!r}")
        self.kind, self.scale = kind, scale
        self.weight_x = nn.Parameter(torch.empty(num_classes, x_dim))
        self.weight_z = nn.Parameter(torch.empty(num_classes, z_dim))
        _uniform_(self.weight_x, 1.0 / math.sqrt(x_dim), generator)
        _uniform_(self.weight_z, 1.0 / math.sqrt(z_dim), generator)
        if kind == "linear":
            self.bias_x = nn.Parameter(torch.empty(num_classes))
            self.bias_z = nn.Parameter(torch.empty(num_classes))
            _uniform_(self.bias_x, 1.0 / math.sqrt(x_dim), generator)
            _uniform_(self.bias_z, 1.0 / math.sqrt(z_dim), generator)

    def _term(self, v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(v, weight, bias)
        squashed = v / (1.0 + v.norm(dim=1, keepdim=True))  # = (‖v‖/(1+‖v‖)) · v/‖v‖, finite at v = 0
        return self.scale * squashed @ F.normalize(weight, dim=1).T

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self._term(x, self.weight_x, getattr(self, "bias_x", None)) + self._term(
            z, self.weight_z, getattr(self, "bias_z", None)
        )

    @torch.no_grad()
    def load_stage1(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Initialise the x-term from a stage-1 linear classifier (official ``backbone_weight_path``)."""
        if weight.shape != self.weight_x.shape:
            raise ValueError(f"stage-1 weight shape {tuple(weight.shape)} != {tuple(self.weight_x.shape)}")
        self.weight_x.copy_(weight)
        if self.kind == "linear" and bias is not None:
            if bias.shape != self.bias_x.shape:
                raise ValueError(f"stage-1 bias shape {tuple(bias.shape)} != {tuple(self.bias_x.shape)}")
            self.bias_x.copy_(bias)


_CLASSIFIER_TYPES = ("linear", "cosine")
_CACLS_INPUTS = ("XZP", "XZ")


class DLSAHead(nn.Module):
    """A fitted DLSA model as a head: pooled features (B, D) → logits (B, C), each sample from one classifier.

    Holds L FlowGMMs, their thresholds τ_d (buffer ``thresholds``, (L,)) and cluster priors (buffer ``priors``,
    (L, K, C)), L cluster-aided classifiers and one regular classifier. Everything the forward pass needs is a
    parameter or buffer; the constructor arguments are plain numbers and strings (:meth:`head_config`), so
    ``DLSAHead(**head.head_config())`` followed by ``load_state_dict`` rebuilds it exactly.

    The flows always run in eval mode (running BatchNorm statistics), also when the surrounding model is put in
    training mode: the routing was fixed when DLSA was fitted, and batch statistics would both change it and
    overwrite the saved running statistics.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        num_clusters: int,
        max_depth: int = 1,
        flow_blocks: int = 2,
        flow_hidden_size: int | None = None,
        flow_hidden_layers: int = 1,
        flow_batch_norm: bool = True,
        classifier_type: str = "linear",
        cosine_scale: float = 16.0,
        cacls_inputs: str = "XZP",
        mean_std: float = 0.05,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if classifier_type not in _CLASSIFIER_TYPES:
            raise ValueError(f"classifier_type must be one of {_CLASSIFIER_TYPES}, got {classifier_type!r}")
        if cacls_inputs not in _CACLS_INPUTS:
            raise ValueError(f"cacls_inputs must be one of {_CACLS_INPUTS}, got {cacls_inputs!r}")
        if max_depth < 1 or num_clusters < 1 or num_classes < 2:
            raise ValueError(
                f"need max_depth >= 1, num_clusters >= 1, num_classes >= 2; "
                f"got {max_depth}, {num_clusters}, {num_classes}"
            )
        self._config = {
            "num_clusters": int(num_clusters), "max_depth": int(max_depth), "flow_blocks": int(flow_blocks),
            "flow_hidden_size": None if flow_hidden_size is None else int(flow_hidden_size),
            "flow_hidden_layers": int(flow_hidden_layers), "flow_batch_norm": bool(flow_batch_norm),
            "classifier_type": classifier_type, "cosine_scale": float(cosine_scale), "cacls_inputs": cacls_inputs,
            "mean_std": float(mean_std),
        }
        self.in_features, self.num_classes = in_features, num_classes
        self.flows = nn.ModuleList(
            FlowGMM(in_features, num_clusters, n_blocks=flow_blocks, hidden_size=flow_hidden_size,
                    n_hidden=flow_hidden_layers, batch_norm=flow_batch_norm, mean_std=mean_std, generator=generator)
            for _ in range(max_depth)
        )
        z_dim = in_features + num_classes if cacls_inputs == "XZP" else in_features
        self.cacls = nn.ModuleList(
            DualHead(in_features, z_dim, num_classes, classifier_type, cosine_scale, generator)
            for _ in range(max_depth)
        )
        self.regcls = DualHead(in_features, in_features, num_classes, classifier_type, cosine_scale, generator)
        self.register_buffer("thresholds", torch.full((max_depth,), float("inf")))
        self.register_buffer("priors", torch.zeros(max_depth, num_clusters, num_classes))

    def head_config(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this head (JSON-serialisable; dims are passed separately)."""
        return dict(self._config)

    @property
    def max_depth(self) -> int:
        return len(self.flows)

    @property
    def regular_route(self) -> int:
        """The route of samples handled by the regular classifier (= ``max_depth``)."""
        return self.max_depth

    def train(self, mode: bool = True) -> "DLSAHead":
        super().train(mode)
        self.flows.eval()  # see the class docstring: routing stays the fitted one
        return self

    def cacls_input(self, depth: int, x: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
        """The z input of the cluster-aided classifier of ``depth`` (0-based): [x ; π_k(x)] or x."""
        if self._config["cacls_inputs"] == "XZ":
            return x
        return torch.cat([x, self.priors[depth][clusters].to(x.dtype)], dim=1)

    def route_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routes (B,) (0..L-1: cluster-aided classifier of that depth; L: regular) and logits (B, C)."""
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"DLSA head expects pooled features of shape (B, {self.in_features}), got {tuple(x.shape)}"
            )
        n = x.shape[0]
        routes = torch.full((n,), self.regular_route, dtype=torch.long, device=x.device)
        logits = x.new_zeros(n, self.num_classes)
        remaining = torch.ones(n, dtype=torch.bool, device=x.device)
        for d, (flow, head) in enumerate(zip(self.flows, self.cacls)):
            idx = remaining.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            comp, llh = flow(x[idx])
            take = llh >= self.thresholds[d]
            chosen = idx[take]
            if chosen.numel():
                xc = x[chosen]
                logits[chosen] = head(xc, self.cacls_input(d, xc, comp[take].argmax(1)))
                routes[chosen] = d
                remaining[chosen] = False
        rest = remaining.nonzero().squeeze(1)
        if rest.numel():
            logits[rest] = self.regcls(x[rest], x[rest])
        return routes, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.route_and_logits(x)[1]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, " + ", ".join(
            f"{k}={v}" for k, v in self._config.items()
        )
