"""Attention transfer for T2R: make each converted GSA layer reproduce the softmax attention it replaced.

`gsa convert` copies a Llama/Mistral checkpoint into a GSA model (gsa.models.t2r); the copied q/k/v/o weights were
trained for softmax attention with RoPE, so the converted layers compute something else and the untouched model
is no language model (SmolLM2-135M: perplexity ~40K against 36). Two cheap steps, both against the source model
itself as the teacher, bring the layers back near their originals before any end-to-end finetuning:

1. Output calibration (`calibrate_output_norm`, closed form, a few batches): the GSA layer ends with
   o_proj(g_norm(swish(o))), whose g_norm output has unit RMS per token, while the softmax layer's o_proj input
   had a small, layer- and channel-specific scale. The g_norm weight w is set to the least-squares solution of
   min_w Σ_t ‖W_o (w ⊙ z_t) − y_t‖², z_t the student's normalised output and y_t the teacher layer's output,
   given the same layer input (one linear solve of size head width × heads per layer).
2. Attention transfer (`distill_attention`, as LoLCATs' first stage, Zhang et al. 2024): the teacher model runs
   once per batch (no gradients), its attention layers' inputs and outputs are recorded, and every GSA layer is
   trained on the recorded input of its own layer to minimise the relative squared error to the recorded output
   (all layers at once, each on its own loss; no layer sees another's error). Only the attention weights move
   (by default all of q/k/v/f/o_proj and g_norm); embeddings, norms, MLPs and head stay as copied.

The teacher is a transformers Llama/Mistral model (`teacher_from_source` builds it from the tensors the
conversion read, sharing their storage; the student's trained tensors are cloned before they change).

    from gsa.models.t2r_distill import calibrate_output_norm, distill_attention
    calibrate_output_norm(student, teacher, batches[:4])
    report = distill_attention(student, teacher, batches, steps=200, lr=1e-3)
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..layers import GatedSlotAttention

ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "f_proj", "o_proj", "g_norm")


def teacher_layers(teacher: nn.Module) -> list[nn.Module]:
    """The attention modules of a transformers Llama/Mistral model (for CausalLM or base model)."""
    base = getattr(teacher, "model", teacher)
    layers = getattr(base, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(
            f"teacher {type(teacher).__name__} is not a Llama/Mistral-style model (no layers[i].self_attn)"
        )
    return [layer.self_attn for layer in layers]


def student_layers(student: nn.Module) -> list[GatedSlotAttention]:
    """The GSA token mixers of a GSAForCausalLM / GSAModel, in layer order."""
    base = getattr(student, "model", student)
    layers = [block.attn for block in base.layers]
    if not all(isinstance(layer, GatedSlotAttention) for layer in layers):
        raise ValueError("attention transfer needs a model whose every layer is GSA (no softmax attention layers)")
    return layers


def _check_pair(student_attn: list[GatedSlotAttention], teacher_attn: list[nn.Module]) -> None:
    if len(student_attn) != len(teacher_attn):
        raise ValueError(f"student has {len(student_attn)} layers, teacher {len(teacher_attn)}")


def _base_model(teacher: nn.Module) -> nn.Module:
    return getattr(teacher, "model", teacher)


@torch.no_grad()
def capture_attention(
    teacher: nn.Module, input_ids: torch.Tensor, output_inputs: bool = False
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]:
    """Run the teacher's decoder (not its LM head) on input_ids [B, T]; per layer, the attention module's input
    (the normalised hidden states) and output (after o_proj), and, when output_inputs, o_proj's input."""
    layers = teacher_layers(teacher)
    inputs: list[torch.Tensor | None] = [None] * len(layers)
    outputs: list[torch.Tensor | None] = [None] * len(layers)
    o_inputs: list[torch.Tensor | None] = [None] * len(layers)
    handles = []

    def pre_hook(i):
        def hook(module, args, kwargs):
            inputs[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        return hook

    def post_hook(i):
        def hook(module, args, output):
            outputs[i] = output[0] if isinstance(output, tuple) else output

        return hook

    def o_hook(i):
        def hook(module, args):
            o_inputs[i] = args[0]

        return hook

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(post_hook(i)))
            if output_inputs:
                handles.append(layer.o_proj.register_forward_pre_hook(o_hook(i)))
        _base_model(teacher)(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs, o_inputs if output_inputs else None


@contextlib.contextmanager
def _normalised_output(attn: GatedSlotAttention):
    """Within the block, attn(x) returns z = RMSNorm(swish(o)) without the g_norm weight and without o_proj
    (o_proj's weight is swapped for an identity, g_norm's for ones; both restored after)."""
    if attn.g_norm is None or attn.g_norm.weight is None:
        raise ValueError("output calibration needs GSA layers with an affine g_norm (use_norm, elementwise_affine)")
    o_weight, g_weight = attn.o_proj.weight, attn.g_norm.weight
    width = g_weight.numel()
    try:
        attn.o_proj.weight = nn.Parameter(torch.eye(width, dtype=o_weight.dtype, device=o_weight.device),
                                          requires_grad=False)
        attn.g_norm.weight = nn.Parameter(torch.ones_like(g_weight), requires_grad=False)
        yield
    finally:
        attn.o_proj.weight, attn.g_norm.weight = o_weight, g_weight


@dataclass
class CalibrationReport:
    method: str
    tokens: int
    seconds: float
    # relative squared error of each layer's output, before and after, on the calibration tokens
    error_before: list[float] = field(default_factory=list)
    error_after: list[float] = field(default_factory=list)

    def summary(self) -> str:
        before = sum(self.error_before) / max(1, len(self.error_before))
        after = sum(self.error_after) / max(1, len(self.error_after))
        return (f"g_norm calibrated ({self.method}) on {self.tokens:,} tokens in {self.seconds:.1f} s: "
                f"layer-output relative error {before:.3g} -> {after:.3g} (mean over layers)")


@torch.no_grad()
def calibrate_output_norm(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[torch.Tensor],
    method: str = "lstsq",
    ridge: float = 1e-4,
) -> CalibrationReport:
    """Set every GSA layer's g_norm weight w so that its output matches the teacher layer's on the same input.
    method "lstsq": w = argmin Σ_t ‖W_o (w ⊙ z_t) − y_t‖² (+ ridge · mean diagonal · ‖w‖²), the best per-channel
    scale in the squared-error sense; "rms": w_c = RMS of the teacher's o_proj input in channel c over RMS of z_c
    (matches scales, ignores correlation). batches: [B, T] token ids."""
    if method not in ("lstsq", "rms"):
        raise ValueError(f"unknown calibration method {method!r}; expected 'lstsq' or 'rms'")
    if not batches:
        raise ValueError("output calibration needs at least one batch of token ids")
    start = time.perf_counter()
    s_layers, t_layers = student_layers(student), teacher_layers(teacher)
    _check_pair(s_layers, t_layers)
    n = len(s_layers)
    gram = [None] * n  # Σ z zᵀ  or  Σ z²
    cross = [None] * n  # Σ z ⊙ (W_oᵀ y)  or  Σ (teacher o_proj input)²
    y_square = [0.0] * n
    before = [0.0] * n
    tokens = 0
    for ids in batches:
        xs, ys, o_ins = capture_attention(teacher, ids, output_inputs=method == "rms")
        tokens += ids.numel()
        for i, attn in enumerate(s_layers):
            x, y = xs[i].to(attn.o_proj.weight.dtype), ys[i].float()
            before[i] += float((attn(x)[0].float() - y).square().sum())
            y_square[i] += float(y.square().sum())
            with _normalised_output(attn):
                z = attn(x)[0].float().flatten(0, -2)
            if method == "lstsq":
                g = z.T @ z
                c = (z * (y.flatten(0, -2) @ attn.o_proj.weight.float())).sum(0)
            else:
                g = z.square().sum(0)
                c = o_ins[i].float().flatten(0, -2).square().sum(0)
            gram[i] = g if gram[i] is None else gram[i] + g
            cross[i] = c if cross[i] is None else cross[i] + c
    for i, attn in enumerate(s_layers):
        if method == "lstsq":
            w_o = attn.o_proj.weight.float()
            system = (w_o.T @ w_o) * gram[i]
            system.diagonal().add_(ridge * system.diagonal().mean().clamp(min=1e-30))
            weight = torch.linalg.solve(system, cross[i])
        else:
            weight = (cross[i] / gram[i].clamp(min=1e-30)).sqrt()
        attn.g_norm.weight.copy_(weight.to(attn.g_norm.weight.dtype))
    after = [0.0] * n
    for ids in batches:
        xs, ys, _ = capture_attention(teacher, ids)
        for i, attn in enumerate(s_layers):
            after[i] += float((attn(xs[i].to(attn.o_proj.weight.dtype))[0].float() - ys[i].float()).square().sum())
    return CalibrationReport(
        method, tokens, time.perf_counter() - start,
        [b / max(s, 1e-30) for b, s in zip(before, y_square)],
        [a / max(s, 1e-30) for a, s in zip(after, y_square)],
    )


@torch.no_grad()
def layer_errors(student: nn.Module, teacher: nn.Module, batches: Sequence[torch.Tensor]) -> list[float]:
    """Per layer, Σ‖student layer output − teacher layer output‖² / Σ‖teacher layer output‖² on the teacher's
    layer inputs (0: the layer reproduces its softmax original; 1: no better than outputting zeros)."""
    s_layers, t_layers = student_layers(student), teacher_layers(teacher)
    _check_pair(s_layers, t_layers)
    error, total = [0.0] * len(s_layers), [0.0] * len(s_layers)
    for ids in batches:
        xs, ys, _ = capture_attention(teacher, ids)
        for i, attn in enumerate(s_layers):
            y = ys[i].float()
            error[i] += float((attn(xs[i].to(attn.o_proj.weight.dtype))[0].float() - y).square().sum())
            total[i] += float(y.square().sum())
    return [e / max(t, 1e-30) for e, t in zip(error, total)]


@dataclass
class DistillationReport:
    steps: int
    tokens: int
    seconds: float
    lr: float
    trained: list[str]
    losses: list[float] = field(default_factory=list)  # mean relative error over layers, each step
    layer_loss_first: list[float] = field(default_factory=list)
    layer_loss_last: list[float] = field(default_factory=list)

    def summary(self) -> str:
        span = max(1, len(self.losses) // 20)  # mean of the first and last 5% of steps (one batch is noisy)
        first = sum(self.losses[:span]) / span
        last = sum(self.losses[-span:]) / span
        return (
            f"attention transfer: {self.steps} steps, {self.tokens:,} tokens, {self.seconds:.0f} s, lr {self.lr:g}, "
            f"trained {', '.join(self.trained)}; layer-output relative error {first:.3g} -> {last:.3g}"
        )


def distill_attention(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[torch.Tensor],
    steps: int,
    lr: float = 1e-3,
    parts: Sequence[str] = ATTENTION_PARTS,
    warmup_steps: int | None = None,
    weight_decay: float = 0.0,
    cache_teacher: bool = False,
    autocast_dtype: torch.dtype | None = None,
    log_every: int = 0,
    log=print,
) -> DistillationReport:
    """Train the `parts` of every GSA layer (names of its submodules, default all of q/k/v/f/o_proj and g_norm)
    to reproduce its teacher layer's output on the teacher's layer input, for `steps` AdamW steps (linear warm-up
    over warmup_steps, default steps // 10, then cosine to lr / 10). Step i uses batches[i % len(batches)] ([B, T]
    token ids on the models' device); with cache_teacher the teacher's records of each batch are kept after the
    first use (memory: 2 · layers · hidden floats a token), else the teacher runs every step. The loss of each
    layer is its relative squared error (so every layer counts alike, whatever its output scale); each layer's
    backward runs right after its forward, so only one layer's graph is alive at a time.

    Tensors the student shares with the teacher (build_gsa_model keeps the source's tensors) are cloned before
    they are trained, so the teacher stays the original. Returns a DistillationReport; the student is left in
    eval mode with requires_grad restored."""
    unknown = sorted(set(parts) - set(ATTENTION_PARTS))
    if unknown or not parts:
        raise ValueError(f"unknown or no layer parts to train {unknown or list(parts)}; choose from {ATTENTION_PARTS}")
    if steps < 1:
        raise ValueError(f"distillation needs steps >= 1, got {steps}")
    if not batches:
        raise ValueError("distillation needs at least one batch of token ids")
    s_layers, t_layers = student_layers(student), teacher_layers(teacher)
    _check_pair(s_layers, t_layers)
    start = time.perf_counter()

    teacher_storage = {p.data_ptr() for p in teacher.parameters()}
    params, names = [], []
    previous_flags = {p: p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    for i, attn in enumerate(s_layers):
        for part in parts:
            module = getattr(attn, part, None)
            if module is None or getattr(module, "weight", None) is None:
                if part == "g_norm":
                    continue  # a layer without an affine output norm
                raise ValueError(f"GSA layer {i} has no {part}")
            weight = module.weight
            if weight.data_ptr() in teacher_storage:
                weight.data = weight.data.clone()
            weight.requires_grad_(True)
            params.append(weight)
            names.append(f"layers.{i}.attn.{part}")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )
    warmup = max(1, steps // 10 if warmup_steps is None else warmup_steps)
    cache: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    report = DistillationReport(steps, 0, 0.0, lr, sorted(set(parts)))
    was_training = student.training
    student.train()
    device_type = next(student.parameters()).device.type

    def autocast():
        return torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None)
    try:
        for step in range(steps):
            scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
            for group in optimizer.param_groups:
                group["lr"] = lr * scale
            index = step % len(batches)
            if index in cache:
                xs, ys = cache[index]
            else:
                with autocast():
                    xs, ys, _ = capture_attention(teacher, batches[index])
                if cache_teacher:
                    cache[index] = (xs, ys)
            report.tokens += batches[index].numel()
            layer_losses = []
            for i, attn in enumerate(s_layers):
                y = ys[i].float()
                with autocast():
                    out = attn(xs[i].to(attn.o_proj.weight.dtype))[0]
                loss = (out.float() - y).square().mean() / y.square().mean().clamp(min=1e-30)
                (loss / len(s_layers)).backward()
                layer_losses.append(float(loss.detach()))
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            report.losses.append(sum(layer_losses) / len(layer_losses))
            if step == 0:
                report.layer_loss_first = layer_losses
            report.layer_loss_last = layer_losses
            if log_every and (step % log_every == 0 or step == steps - 1):
                log(f"  distill step {step + 1}/{steps}: layer-output relative error {report.losses[-1]:.4f} "
                    f"({time.perf_counter() - start:.0f} s)")
    finally:
        for p, flag in previous_flags.items():
            p.requires_grad_(flag)
        for p in params:
            p.grad = None
        student.train(was_training)
    student.eval()
    report.seconds = time.perf_counter() - start
    return report
