"""Shared test helpers: random GSA inputs and relative errors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are zero)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    denom = b.norm()
    return float((a - b).norm() / denom) if denom > 0 else float((a - b).norm())


def gsa_inputs(B, T, HQ, H, K, V, M, dtype=torch.float64, seed=0, gate_scale=1.0, device="cpu"):
    """q, k, v, s, g as the layer makes them: g = logsigmoid(x) / 8 * gate_scale, s = 1 - exp(g)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v = randn(B, T, HQ, K), randn(B, T, H, K), randn(B, T, H, V)
    g = F.logsigmoid(randn(B, T, H, M) * 2) / 8 * gate_scale
    s = 1 - torch.exp(g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, s, g)]


def random_state(N, H, K, V, M, dtype=torch.float64, seed=1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    hk = torch.randn(N, H, K, M, generator=gen, dtype=torch.float64)
    hv = torch.randn(N, H, M, V, generator=gen, dtype=torch.float64)
    return hk.to(device=device, dtype=dtype), hv.to(device=device, dtype=dtype)


def outputs_and_grads(fn, tensors, seed=2):
    """Run fn(*tensors) -> (o, (hk, hv)), backprop fixed random cotangents, return [o, hk, hv, *grads]."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    o, (hk, hv) = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((x.double() * torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.device)).sum()
               for x in (o, hk, hv))
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach(), hk.detach(), hv.detach(), *grads]


NAMES = ["o", "hk", "hv", "dq", "dk", "dv", "ds", "dg", "dhk0", "dhv0"]


def assert_close_all(got, want, tol, names=NAMES, context=""):
    errors = {n: rel_err(a, b) for n, a, b in zip(names, got, want)}
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f"{context} relative errors above {tol}: {bad} (all: {errors})"
    for n, a in zip(names, got):
        assert torch.isfinite(a).all(), f"{context} {n} has non-finite values"
