"""GroupNorm with a closed-form double backward, for second-order MAML on a CPU.

Second-order MAML differentiates the inner loop's gradients, i.e. every layer's backward. For
GroupNorm PyTorch then runs a generic, differentiable re-implementation of its backward (some 40
operations over whole feature maps, each differentiated again in the outer pass): after the
convolutions, the largest cost of a second-order meta-step of the tiny U-Net. Here the backward
is PyTorch's fused kernel, and the backward of that backward is written out with the same kernel
(r P(t) below is GroupNorm's backward of t with unit weights) and three per-sample dot products.

`group_norm(x, groups, weight, bias, eps)` equals `torch.nn.functional.group_norm` on (N, C, H, W)
maps, in value and first and second derivatives (up to float rounding; in float32 under autocast,
as autocast runs PyTorch's). `second_order_norms(model)` routes the model's affine GroupNorm
layers through it for the duration of a block (the weights `functional_call` swaps in are used).

The double backward, per sample and group of M = channels x pixels elements: x̂ = (x - μ) r,
P(t) = t - mean(t) - x̂ mean(t x̂) (a projection, its own adjoint), dx = r P(g dy) for the layer
weight g; given the outer gradients u, v, w of (dx, dg, db):

    ∂/∂dy = g r P(u) + v x̂ + w
    ∂/∂g  = Σ_{samples, pixels} dy r P(u)
    ∂/∂x  = r P(v dy) - r mean(g dy x̂) r P(u) - r mean(u x̂) dx - r mean(u dx) x̂
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _GroupNormBackward(torch.autograd.Function):
    """(dy, x, weight) -> (dx, dweight, dbias) of GroupNorm, differentiable in closed form."""

    @staticmethod
    def forward(
        ctx: Any, dy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, groups: int, mask: list[bool]
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        n, c = x.shape[:2]
        dx, dweight, dbias = torch.ops.aten.native_group_norm_backward(
            dy, x, mean, rstd, weight, n, c, x[0, 0].numel(), groups, mask
        )
        ctx.save_for_backward(dy, x, weight, mean, rstd, dx)
        ctx.groups = groups
        return dx, dweight, dbias

    @staticmethod
    def backward(ctx: Any, u: Tensor | None, v: Tensor | None, w: Tensor | None) -> tuple[Tensor | None, ...]:
        dy, x, weight, mean, rstd, dx = ctx.saved_tensors
        groups: int = ctx.groups
        n, c = x.shape[:2]
        pixels = x[0, 0].numel()
        size = (c // groups) * pixels  # elements per sample and group

        def by_channel(per_group: Tensor) -> Tensor:  # (N, G) -> (N, C, 1, 1)
            values = per_group.repeat_interleave(c // groups, dim=1) if groups > 1 else per_group
            return values.view(n, -1, 1, 1)

        def group_means(per_channel: Tensor) -> Tensor:  # (N, C) -> (N, G)
            return per_channel.view(n, groups, -1).sum(dim=2) / size

        def projected(t: Tensor, scale: Tensor | None) -> Tensor:  # r P(scale t): PyTorch's fused kernel
            return torch.ops.aten.native_group_norm_backward(
                t, x, mean, rstd, scale, n, c, pixels, groups, [True, False, False]
            )[0]

        r = rstd.view(n, groups)
        xhat = (x - by_channel(mean.view(n, groups))) * by_channel(r)
        z = None if u is None else projected(u, None)  # r P(u)
        g_dy = g_x = g_weight = None
        if ctx.needs_input_grad[0]:  # g r P(u) + v x̂ + w
            g_dy = torch.zeros_like(dy) if v is None else xhat * v.view(1, c, 1, 1)
            if z is not None:
                g_dy = g_dy.addcmul_(z, weight.view(1, c, 1, 1))
            if w is not None:
                g_dy = g_dy.add_(w.view(1, c, 1, 1))
        # per-channel Σ_pixels dy r P(u): ∂/∂g, and mean(u dx) = mean(r P(u) g dy) (P is self-adjoint)
        dy_z = None if z is None else (dy * z).sum(dim=(2, 3))
        if ctx.needs_input_grad[2] and dy_z is not None:
            g_weight = dy_z.sum(dim=0)
        if ctx.needs_input_grad[1]:
            # r P(v dy) - r mean(g dy x̂) r P(u) - r mean(u x̂) dx - r mean(u dx) x̂
            g_x = torch.zeros_like(x) if v is None else projected(dy, v)
            if u is not None and z is not None and dy_z is not None:
                c_ax = group_means((dy * xhat).sum(dim=(2, 3)) * weight)
                d_ux = group_means((u * xhat).sum(dim=(2, 3)))
                e_udx = group_means(dy_z * weight)
                g_x = g_x.addcmul_(z, by_channel(-r * c_ax))
                g_x = g_x.addcmul_(dx, by_channel(-r * d_ux))
                g_x = g_x.addcmul_(xhat, by_channel(-r * e_udx))
        return g_dy, g_x, g_weight, None, None, None, None


class _GroupNorm(torch.autograd.Function):
    """GroupNorm whose backward, when it is itself differentiated, is `_GroupNormBackward`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
        n, c = x.shape[:2]
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, x[0, 0].numel(), groups, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.groups = groups
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        mask = [bool(needed) for needed in ctx.needs_input_grad[:3]]
        if torch.is_grad_enabled():  # create_graph: this backward is differentiated later
            dx, dweight, dbias = _GroupNormBackward.apply(dy, x, weight, mean, rstd, ctx.groups, mask)
        else:
            n, c = x.shape[:2]
            dx, dweight, dbias = torch.ops.aten.native_group_norm_backward(
                dy, x, mean, rstd, weight, n, c, x[0, 0].numel(), ctx.groups, mask
            )
        return dx, dweight, dbias, None, None


def group_norm(x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """`F.group_norm(x, groups, weight, bias, eps)` of an (N, C, H, W) map, with a cheap double
    backward; in float32 under autocast, as autocast runs PyTorch's."""
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return _GroupNorm.apply(x.float(), weight.float(), bias.float(), groups, eps)
    return _GroupNorm.apply(x, weight, bias, groups, eps)


def _norm_forward(layer: nn.GroupNorm, x: Tensor) -> Tensor:
    if x.dim() != 4:
        return F.group_norm(x, layer.num_groups, layer.weight, layer.bias, layer.eps)
    return group_norm(x, layer.num_groups, layer.weight, layer.bias, layer.eps)


@contextmanager
def second_order_norms(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside the block the affine GroupNorm layers of `model` run through `group_norm` (when
    `enabled`); their forward is restored at its end."""
    layers = [m for m in model.modules() if type(m) is nn.GroupNorm and m.affine] if enabled else []
    for layer in layers:
        layer.forward = _norm_forward.__get__(layer)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
