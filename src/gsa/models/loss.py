"""Next-token cross-entropy without the full [tokens, vocab] float32 logits tensor.

The LM head and the loss run over row chunks; each chunk's softmax gradient is formed right away (when the
inputs need gradients) and folded into grad_hidden / grad_weight, so peak extra memory is one chunk of logits.
Where the Triton kernels run (gsa.layers.fused_triton), one row kernel forms a chunk's loss and writes its softmax
gradient over the logits; elsewhere the chunk is taken to float32, turned into the softmax in place, and cast
back to the weight's dtype.

Inside bf16 autocast the products run in bf16 as F.linear's would there (float32 weights are cast once a call,
the loss is taken in float32) and the gradients come back in the inputs' dtypes, the weight's summed in float32.
Left to autocast, `torch.mm(..., out=)` is not cast at all: the [tokens, vocab] x [vocab, d] product of
grad_hidden ran in float32 (~2.1 TFLOP a 1.3B step at 16K tokens). Under fp16 autocast autocast keeps its way:
the softmax gradient, already divided by the token count, would underflow in fp16 before a GradScaler's scale
reaches it (it arrives in backward).
"""

from __future__ import annotations

import torch

from ..layers.fused import autocast_dtype, triton_wanted
from ..layers.fused_triton import cross_entropy_rows

IGNORE_INDEX = -100


def _rows_kernel(logits: torch.Tensor, weight: torch.Tensor, acc: torch.dtype) -> bool:
    """Whether the Triton row kernel takes a chunk's loss and softmax gradient (gsa.layers.fused_triton)."""
    return (acc == torch.float32 and logits.dtype == weight.dtype and logits.is_contiguous()
            and logits.dtype in (torch.float32, torch.bfloat16, torch.float16) and triton_wanted(logits))


# whether CUDA's matrix product accumulating in float32 from bf16 / fp16 operands (addmm with out_dtype) is there
_WIDE_ADDMM = [hasattr(torch.ops.aten.addmm, "dtype_out")]


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b. For a float32 acc and bf16 / fp16 operands on CUDA one product that adds into acc in float32
    (no rounded bf16 product, no float32 copy of it and no separate addition: ~1.6 ms of the 1.3B model's step);
    elsewhere the product, cast, added."""
    if _WIDE_ADDMM[0] and acc.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and acc.dtype == torch.float32:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError):
            if torch.cuda.is_current_stream_capturing():
                raise
            _WIDE_ADDMM[0] = False  # a torch or GPU that refuses these operands: the plain form from now on
    acc += (a @ b).to(acc.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_rows, mm_dtype, needs_grad):
        # mm_dtype: autocast's dtype for the products (autocast itself is off in here), None outside autocast.
        # needs_grad: taken outside, where grad mode is seen (in here it is always off)
        mm_weight = weight if mm_dtype is None else weight.to(mm_dtype)
        valid = labels != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None  # every row is written below
        grad_weight = (
            torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) if needs_grad else None
        )
        acc = torch.promote_types(mm_weight.dtype, torch.float32)  # float32 at least, float64 stays float64
        total = hidden.new_zeros((), dtype=acc)
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows]
            h = h if mm_dtype is None else h.to(mm_dtype)
            y = labels[start : start + chunk_rows]
            ok = valid[start : start + chunk_rows]
            logits = h @ mm_weight.t()
            if _rows_kernel(logits, mm_weight, acc):
                # one kernel reads the logits twice and writes the gradient over them in their dtype, instead of
                # a float32 copy, softmax, gradient and a cast back as separate passes over [rows, vocab]
                total = total + cross_entropy_rows(logits, y, count, IGNORE_INDEX, needs_grad).sum()
                d_logits = logits
            else:
                logits = logits.to(acc)
                lse = torch.logsumexp(logits, -1)
                target = logits.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)
                total = total + ((lse - target) * ok).sum()
                if needs_grad:
                    d_logits = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax in place: one [rows, V] buffer
                    d_logits[torch.arange(len(y), device=y.device), y.clamp(min=0)] -= 1
                    d_logits *= ok.unsqueeze(1).to(acc) / count.to(acc)
                    d_logits = d_logits.to(mm_weight.dtype)
            if needs_grad:
                if grad_hidden.dtype == d_logits.dtype:
                    torch.mm(d_logits, mm_weight, out=grad_hidden[start : start + chunk_rows])
                else:
                    grad_hidden[start : start + chunk_rows] = d_logits @ mm_weight
                _add_product(grad_weight, d_logits.t(), h)
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        d_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden * grad_loss.to(grad_hidden.dtype), d_weight, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 4096
) -> torch.Tensor:
    """Mean cross-entropy of softmax(hidden @ weightᵀ) against labels over rows whose label is not -100.

    hidden [N, D], weight [V, D], labels [N]. Equal to F.cross_entropy(hidden @ weight.T, labels) in value
    and gradients; inside bf16 autocast, equal to what autocast makes of that composition (products in bf16, the
    loss in float32). Under torch.no_grad (evaluation) only the loss is formed.
    """
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    mm_dtype = autocast_dtype(hidden.device.type)
    if mm_dtype == torch.bfloat16 and torch.float64 not in (hidden.dtype, weight.dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk_rows, mm_dtype, needs_grad)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk_rows, None, needs_grad)
