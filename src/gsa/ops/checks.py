"""Input validation for the GSA operator: every error names the tensor, what was expected and what came."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class GSAShapes:
    """Sizes of one operator call: B batch, T time, HQ query heads, H key/value heads, widths K, V, M."""

    B: int
    T: int
    HQ: int
    H: int
    K: int
    V: int
    M: int
    num_sequences: int  # N: B without cu_seqlens, len(cu_seqlens) - 1 with it

    @property
    def group(self) -> int:
        return self.HQ // self.H


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None,
    cu_seqlens: torch.Tensor | None,
    check_gate_values: bool = True,
) -> GSAShapes:
    """Validate a full-sequence call and return its sizes."""
    named = {"q": q, "k": k, "v": v, "s": s, "g": g}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"expected {name} of shape [B, T, H, D] (4 dims), got {_shape(t)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    for name, t in named.items():
        if t.device != q.device:
            raise ValueError(f"all inputs must be on one device: q is on {q.device}, {name} on {t.device}")
        if t.dtype != q.dtype:
            raise TypeError(f"all inputs must share one dtype: q is {q.dtype}, {name} is {t.dtype}")
    B, T, HQ, K = q.shape
    H = k.shape[2]
    V = v.shape[3]
    M = s.shape[3]
    if T < 1:
        raise ValueError(f"expected at least one time step, got q of shape {_shape(q)}")
    expected = {"k": (B, T, H, K), "v": (B, T, H, V), "s": (B, T, H, M), "g": (B, T, H, M)}
    letters = {"k": "[B, T, H, K]", "v": "[B, T, H, V]", "s": "[B, T, H, M]", "g": "[B, T, H, M]"}
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(
                f"expected {name} of shape {letters[name]} = [{', '.join(map(str, shape))}] "
                f"(from q {_shape(q)}, k heads {H}, v width {V}, slots {M}), got {_shape(named[name])}"
            )
    if H < 1 or HQ % H != 0:
        raise ValueError(f"query heads HQ={HQ} must be a multiple of key/value heads H={H}")
    if check_gate_values and torch.is_floating_point(g) and not torch.compiler.is_compiling():
        if bool((g > 0).any()):
            raise ValueError(f"g holds log forget gates and must be <= 0 everywhere; max is {g.max().item():.4g}")

    num_sequences = B
    if cu_seqlens is not None:
        num_sequences = check_cu_seqlens(cu_seqlens, B, T, q.device)
    if initial_state is not None:
        check_state(initial_state, num_sequences, H, K, V, M, q.device, "initial_state")
    return GSAShapes(B, T, HQ, H, K, V, M, num_sequences)


class LastTensorCache:
    """A value derived from the last tensor it was asked for, kept while that tensor is alive and unchanged in
    place (same object, same version counter): every layer of a model is handed the same cu_seqlens, and what is
    derived from it (its offsets on the host, the chunk layout) is the same for all of them."""

    def __init__(self):
        self._key = None
        self._value = None

    def get(self, tensor: torch.Tensor, extra, make):
        try:
            version = tensor._version
        except RuntimeError:  # inference-mode tensors keep no version counter: nothing is kept for them
            return make()
        if self._key is not None:
            ref, kept_version, kept_extra = self._key
            if ref() is tensor and kept_version == version and kept_extra == extra:
                return self._value
        value = make()
        self._key, self._value = (weakref.ref(tensor), version, extra), value
        return value


_HOST_OFFSETS = LastTensorCache()


def host_offsets(cu_seqlens: torch.Tensor) -> list[int]:
    """cu_seqlens as a Python list. Reading it from a GPU waits for the device; a model's layers all get the same
    tensor, so it is read once per tensor (per batch), not once per layer."""
    return _HOST_OFFSETS.get(cu_seqlens, None, cu_seqlens.tolist)


def check_cu_seqlens(cu_seqlens: torch.Tensor, B: int, T: int, device: torch.device) -> int:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        got = _shape(cu_seqlens) if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"expected cu_seqlens of shape [N + 1] with N >= 1, got {got}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    if B != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences packed along T), got B={B}")
    cpu = host_offsets(cu_seqlens)
    if cpu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cpu[0]}")
    if cpu[-1] != T:
        raise ValueError(f"cu_seqlens must end at T={T}, got {cpu[-1]}")
    if any(b <= a for a, b in zip(cpu[:-1], cpu[1:])):
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty sequences), got {cpu}")
    return len(cpu) - 1


def check_state(
    state: tuple[torch.Tensor, torch.Tensor],
    N: int,
    H: int,
    K: int,
    V: int,
    M: int,
    device: torch.device,
    name: str,
) -> None:
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise TypeError(f"{name} must be a pair (Hk [N, H, K, M], Hv [N, H, M, V]), got {type(state).__name__}")
    hk, hv = state
    for part, t, shape in (("Hk", hk, (N, H, K, M)), ("Hv", hv, (N, H, M, V))):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} {part} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            letters = "[N, H, K, M]" if part == "Hk" else "[N, H, M, V]"
            raise ValueError(
                f"expected {name} {part} of shape {letters} = [{', '.join(map(str, shape))}], got {_shape(t)}"
            )
        if t.device != device:
            raise ValueError(f"{name} {part} is on {t.device} but q is on {device}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} {part} must be a float tensor, got {t.dtype}")


def check_step_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor | None,
    g: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor],
    g_name: str = "g",
) -> GSAShapes:
    """Validate a one-token decoding call: q [B, HQ, K], k [B, H, K], v [B, H, V], s/g [B, H, M] (s None and
    g named `g_name` when the gates come as logits).

    A decoding loop calls this every token, so valid inputs take one short pass of comparisons; anything it does
    not accept goes through `_check_step_inputs_in_detail`, which names what is wrong."""
    if (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
            and isinstance(g, torch.Tensor) and (s is None or isinstance(s, torch.Tensor))
            and isinstance(state, (tuple, list)) and len(state) == 2
            and isinstance(state[0], torch.Tensor) and isinstance(state[1], torch.Tensor)
            and q.dim() == k.dim() == v.dim() == g.dim() == 3):
        B, HQ, K = q.shape
        H, V, M = k.shape[1], v.shape[2], g.shape[2]
        hk, hv = state
        device = q.device
        if (k.shape == (B, H, K) and v.shape == (B, H, V) and g.shape == (B, H, M) and H > 0 and HQ % H == 0
                and (s is None or (s.shape == (B, H, M) and s.device == device))
                and hk.shape == (B, H, K, M) and hv.shape == (B, H, M, V)
                and hk.dtype in FLOAT_DTYPES and hv.dtype in FLOAT_DTYPES
                and k.device == device and v.device == device and g.device == device
                and hk.device == device and hv.device == device):
            return GSAShapes(B, 1, HQ, H, K, V, M, B)
    return _check_step_inputs_in_detail(q, k, v, s, g, state, g_name)


def _check_step_inputs_in_detail(q, k, v, s, g, state, g_name: str) -> GSAShapes:
    named = {"q": q, "k": k, "v": v, **({"s": s} if s is not None else {}), g_name: g}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"expected {name} of shape [B, H, D] (3 dims, one token), got {_shape(t)}")
        if t.device != q.device:
            raise ValueError(f"all inputs must be on one device: q is on {q.device}, {name} on {t.device}")
    B, HQ, K = q.shape
    H, V, M = k.shape[1], v.shape[2], g.shape[2]
    expected = {"k": (B, H, K), "v": (B, H, V), "s": (B, H, M), g_name: (B, H, M)}
    for name, shape in ((n, shape) for n, shape in expected.items() if n in named):
        if tuple(named[name].shape) != shape:
            raise ValueError(f"expected {name} of shape [{', '.join(map(str, shape))}], got {_shape(named[name])}")
    if H < 1 or HQ % H != 0:
        raise ValueError(f"query heads HQ={HQ} must be a multiple of key/value heads H={H} (H >= 1)")
    check_state(state, B, H, K, V, M, q.device, "state")
    return GSAShapes(B, 1, HQ, H, K, V, M, B)
