"""The public operator: one signature (FLA's `chunk_gsa` argument order), several backends."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_inputs, check_step_inputs
from .chunk import chunk_gsa
from .projections import FEATURE_MAPS, slot_gates
from .reference import compute_dtype, recurrent_step, reference_gsa

BACKENDS = ("auto", "reference", "torch", "triton")


def triton_available(device: torch.device) -> bool:
    """True when the Triton kernels can run on tensors of this device."""
    if device.type != "cuda":
        return False
    try:
        from .triton import KERNELS_AVAILABLE
    except ImportError:
        return False
    return KERNELS_AVAILABLE


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that `backend` ("auto" included) runs on tensors of this device."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if triton_available(device) else "torch"
    return backend


def gated_slot_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    check_gate_values: bool = True,
    keep_states: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Gated Slot Attention over whole sequences.

    Args:
        q: queries [B, T, HQ, K]; HQ a multiple of H (grouped-query heads).
        k: keys [B, T, H, K].  v: values [B, T, H, V].
        s: slot write strengths [B, T, H, M] (the layer uses 1 - exp(g)).
        g: log forget gates [B, T, H, M], all <= 0.
        scale: multiplies q·Hk before the slot softmax; default K ** -0.5.
        initial_state: (Hk0 [N, H, K, M], Hv0 [N, H, M, V]), N = B, or the number of packed sequences.
        output_final_state: also return the final (Hk, Hv), in float32 (float64 for float64 inputs).
        cu_seqlens: [N + 1] offsets of sequences packed along T (then B must be 1); no state crosses them.
        backend: "reference" (step by step), "torch" (chunked, CPU and fallback), "triton" (GPU), or
            "auto": triton on CUDA tensors when available, else torch.
        check_gate_values: verify g <= 0 (one device sync); callers that build g as a log-sigmoid skip it.
        keep_states: training memory against speed on the Triton backend: keep the chunk states the forward
            computes ([Σ ceil(T_i / 64) + N, H, K + V, M] in the operand dtype) for the backward instead of
            computing them again there (False, the default, recomputes them as the paper does). The torch backend
            keeps what autograd keeps either way.

    Returns:
        (o [B, T, HQ, V] in the dtype of q, final_state or None).
    """
    shapes = check_inputs(q, k, v, s, g, initial_state, cu_seqlens, check_gate_values)
    if scale is None:
        scale = shapes.K**-0.5
    chosen = resolve_backend(backend, q.device)
    args = (q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens)
    # The operator fixes its own precision (float32 accumulation and softmax whatever the input dtype), so an
    # enclosing autocast region must not recast its internal matmuls.
    with torch.autocast(q.device.type, enabled=False):
        return _run(chosen, args, keep_states)


def _run(chosen: str, args: tuple, keep_states: bool):
    q = args[0]
    if chosen == "reference":
        o, final_state = reference_gsa(*args)
        return o.to(q.dtype), final_state
    if chosen == "torch":
        return chunk_gsa(*args)
    if not triton_available(q.device):
        raise RuntimeError(f"backend='triton' needs CUDA tensors and an importable triton; q is on {q.device}")
    from .triton import triton_gsa

    return triton_gsa(*args, keep_states=keep_states)


def gated_slot_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor],
    scale: float | None = None,
    *,
    inplace: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One decoding step for a batch of sequences.

    Args:
        q [B, HQ, K], k [B, H, K], v [B, H, V], s and g [B, H, M]: the new token of each sequence.
        state: (Hk [B, H, K, M], Hv [B, H, M, V]), float32 recommended.
        inplace: write the new state into `state`'s tensors (what a decode loop or a CUDA graph wants)
            instead of returning fresh ones.

    Returns:
        (o [B, HQ, V] in the dtype of q, the new state: `state` itself when inplace).
    """
    shapes = check_step_inputs(q, k, v, s, g, state)
    if scale is None:
        scale = shapes.K**-0.5
    chosen = resolve_backend(backend, q.device)
    if chosen == "triton":  # the kernels compute in float32 whatever autocast says: no context to enter a token
        from .triton import triton_gsa_step

        return triton_gsa_step(q, k, v, s, g, state, scale, inplace=inplace)
    with torch.autocast(q.device.type, enabled=False):
        return _run_step(q, k, v, s, g, state, scale, inplace)


def _run_step(q, k, v, s, g, state, scale, inplace):
    """The PyTorch backends' step (torch, reference), in the state's precision."""
    hk, hv = state
    dtype = compute_dtype(hk.dtype)
    o, new_hk, new_hv = recurrent_step(
        *(t.to(dtype) for t in (q, k, v, s, g)), hk.to(dtype), hv.to(dtype), scale
    )
    if inplace:
        hk.copy_(new_hk)
        hv.copy_(new_hv)
        return o.to(q.dtype), state
    return o.to(q.dtype), (new_hk, new_hv)


def gated_slot_attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    f: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor],
    scale: float | None = None,
    *,
    gate_logit_normalizer: float = 8.0,
    feature_map: str = "swish",
    clamp_min: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One decoding step of a GSA layer from its raw projections, the state updated in place.

    Equal to `gated_slot_attention_step(φ(q), φ(k), swish(v), s, g, state, scale, inplace=True)` with
    (s, g) = `slot_gates(f, gate_logit_normalizer, clamp_min)`; on the GPU the feature maps and gates are formed
    inside the step kernels (two launches for the whole step, which is what bounds decoding latency).

    Args:
        q [B, HQ, K], k [B, H, K], v [B, H, V]: projections before their activations; f [B, H, M]: gate logits.
        state: (Hk [B, H, K, M], Hv [B, H, M, V]), float32 contiguous on the GPU.

    Returns:
        o [B, HQ, V] in the dtype of q.
    """
    shapes = check_step_inputs(q, k, v, None, f, state, g_name="f")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"unknown feature_map {feature_map!r}; expected one of {sorted(FEATURE_MAPS)}")
    if scale is None:
        scale = shapes.K**-0.5
    chosen = resolve_backend(backend, q.device)
    if chosen == "triton":  # float32 inside the kernels whatever autocast says
        from .triton import triton_gsa_decode

        return triton_gsa_decode(q, k, v, f, state, scale, (gate_logit_normalizer, feature_map, clamp_min))
    with torch.autocast(q.device.type, enabled=False):
        # activations in the state's precision (float32), as the kernels form them
        dtype = compute_dtype(state[0].dtype)
        phi = FEATURE_MAPS[feature_map]
        s, g = slot_gates(f.to(dtype), gate_logit_normalizer, clamp_min)
        o, _ = _run_step(phi(q.to(dtype)), phi(k.to(dtype)), F.silu(v.to(dtype)), s, g, state, scale, True)
        return o.to(q.dtype)
