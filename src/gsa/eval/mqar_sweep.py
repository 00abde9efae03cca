"""Train and test small models on MQAR: the paper's Fig. 3a sweep (2 layers, widths 64-512, seq 512, 64 pairs).

Each run trains one model (kind, width) at one learning rate and seed on freshly drawn examples every step,
checks a held-out validation set every `eval_every` steps (stopping once it reaches `stop_accuracy`), and is
scored on a fixed test set: accuracy = the fraction of queries whose value is the argmax prediction. A model
kind's accuracy at a width is that of its best learning rate (mean over seeds), as Zoology reports it.

A run warms up before any clock starts (Triton compilation of the GSA kernels happens in its first call, per
process and shape). Under a time budget it then times a few throwaway steps and plans its step count from them,
and its learning-rate schedule spans the planned steps (see `train_and_test`); a training step reads nothing back
from the device, so worker processes sharing a GPU never wait on each other's queues for it.

Runs are independent, so a sweep spreads them over worker processes that share the device (or, with several
GPUs visible and the device a bare "cuda", over the GPUs: one run per GPU when --workers is their number).
Separate processes on one GPU time-slice it (no MPS), so they overlap each other's host work and idle gaps rather
than run kernels together: each run's steps/s in the results shows what it got.
"""

from __future__ import annotations

import json
import math
import os
import queue
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..layers import GatedSlotAttention, ShortConvolution
from ..models import GSAConfig, GSAForCausalLM
from .mqar import IGNORE_INDEX, MQARTask, mqar_examples, training_mixture
from .mqar_sittings import RunSittings

# Fig. 3a of the paper, accuracy (%) at widths 64 / 128 / 256 / 512 (read off the plot; seq 512, 64 pairs).
PAPER_ACCURACY = {
    "GSA (paper)": {64: 28, 128: 98, 256: 99, 512: 99},
    "GLA (paper)": {64: 4, 128: 85, 256: 99, 512: 99},
    "Mamba (paper)": {64: 0, 128: 99, 256: 99, 512: 100},
}
VALIDATION_SEED = 1_000_003  # held-out sets use seeds no training run draws with
TEST_SEED = 2_000_003


def fla_available() -> bool:
    try:
        import fla.models  # noqa: F401
    except ImportError:
        return False
    return True


NUM_LAYERS = 2  # the paper's MQAR models


def _sizes(width: int, vocab_size: int, head_dim: int) -> dict:
    """What every MQAR model shares: two layers at `width`, heads of `head_dim` (at least one head)."""
    return {"vocab_size": vocab_size, "hidden_size": width, "num_hidden_layers": NUM_LAYERS,
            "num_heads": max(1, width // head_dim)}


def _our_model(kind: str):
    """`gsa`: GSA in both layers; `attention`: our blocks with softmax attention (RoPE) in both layers instead."""

    def build(width: int, vocab_size: int, options: dict):
        if kind == "attention":
            sizes = _sizes(width, vocab_size, options["attention_head_dim"])
            mixer = {"attn": {"layers": list(range(NUM_LAYERS)), "num_heads": sizes["num_heads"]}}
        else:
            sizes = _sizes(width, vocab_size, options["gsa_head_dim"])
            mixer = {"num_slots": options["num_slots"], "use_short_conv": options["short_conv"],
                     "gate_logit_normalizer": options["gate_damping"]}
        model = GSAForCausalLM(GSAConfig(**sizes, **mixer, bos_token_id=None, eos_token_id=None))
        for module in model.modules():
            if isinstance(module, GatedSlotAttention):
                module.backend = options["gsa_backend"]
            if isinstance(module, ShortConvolution) and options.get("conv_init_std") is not None:
                torch.nn.init.normal_(module.weight, std=options["conv_init_std"])  # FLA's draw: N(0, 0.02)
        return model

    return build


def _fla_model(kind: str):
    """FLA's own GSA / GLA models at the same sizes as ours."""

    def build(width: int, vocab_size: int, options: dict):
        import fla.models as fla_models

        config_class, model_class = {
            "fla-gsa": (fla_models.GSAConfig, fla_models.GSAForCausalLM),
            "fla-gla": (fla_models.GLAConfig, fla_models.GLAForCausalLM),
        }[kind]
        extra = {}
        if kind == "fla-gsa":
            extra = {"num_slots": options["num_slots"], "gate_logit_normalizer": options["gate_damping"]}
        sizes = _sizes(width, vocab_size, options["gsa_head_dim"])
        return model_class(config_class(**sizes, use_short_conv=options["short_conv"], **extra))

    return build


MODEL_BUILDERS: dict[str, Callable] = {
    "gsa": _our_model("gsa"),
    "attention": _our_model("attention"),
    "fla-gsa": _fla_model("fla-gsa"),
    "fla-gla": _fla_model("fla-gla"),
}


def default_models() -> list[str]:
    """Ours always; FLA's GSA and GLA when flash-linear-attention is importable and a GPU can run its kernels."""
    models = ["gsa", "attention"]
    if torch.cuda.is_available() and fla_available():  # importing fla without a GPU only warns
        models += ["fla-gsa", "fla-gla"]
    return models


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 2000
    batch_size: int = 64
    warmup_fraction: float = 0.1
    weight_decay: float = 0.1
    eval_every: int = 100
    validation_examples: int = 256
    stop_accuracy: float = 0.99
    test_examples: int = 1000
    eval_batch_size: int = 256
    # A wall-clock budget per run, so a sweep's length is bounded. The run first warms up (kernel compilation,
    # allocation: not counted), times `calibration_steps` throwaway steps, and plans min(steps, what fits in the
    # budget) steps; the learning-rate schedule spans the plan. When its pace drifts from the calibration (a
    # device shared with other runs) it re-plans; `overrun` x the budget is a hard stop.
    max_train_seconds: float | None = None
    calibration_steps: int = 5
    overrun: float = 1.5
    # Train on the target and its easier copies (seq_len and num_pairs halved, up to this many sizes in all), one
    # size per step in turn with the same tokens per batch, as Zoology trains on mixed sizes; 1 = the target only.
    # Without it, small linear-state models sit on the loss plateau for thousands of steps (docs/evaluation.md).
    mixture_levels: int = 4
    # On CUDA, each training size's step (forward, backward, clipping, AdamW) is captured once as a CUDA graph and
    # replayed: MQAR's small models are bound by the host's kernel launches (d=64: ~27 ms a step from Python on the
    # H200 for a few ms of GPU work). Falls back to eager steps if a capture fails.
    cuda_graphs: bool = True
    # Runs longer than one sitting (gsa.eval.mqar_sittings): train the fixed step schedule for at most this many
    # seconds, save the run's state under checkpoint_dir, and continue from there when the same sweep runs again.
    sitting_seconds: float | None = None
    checkpoint_dir: str | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every", "validation_examples", "test_examples", "eval_batch_size",
                     "calibration_steps", "mixture_levels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_train_seconds is not None and self.max_train_seconds <= 0:
            raise ValueError(f"max_train_seconds must be > 0, got {self.max_train_seconds}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.overrun < 1:
            raise ValueError(f"overrun must be >= 1, got {self.overrun}")
        if self.sitting_seconds is not None:
            if self.sitting_seconds <= 0:
                raise ValueError(f"sitting_seconds must be > 0, got {self.sitting_seconds}")
            if self.checkpoint_dir is None:
                raise ValueError("sitting_seconds needs a checkpoint_dir to keep the runs' state between sittings")
            if self.max_train_seconds is not None:
                raise ValueError("sittings follow a fixed step schedule: give steps, not a time budget "
                                 f"(max_train_seconds {self.max_train_seconds})")


@dataclass(frozen=True)
class ModelOptions:
    """Heads are width // head_dim (at least one): head width 64 at every model width, as the attention baseline."""

    gsa_head_dim: int = 64
    num_slots: int = 64
    short_conv: bool = True
    # τ of the slot gates, alpha = sigmoid(f)^(1/τ) (the paper's 8): larger forgets more slowly at initialisation
    gate_damping: float = 8.0
    # the short convolutions' weights drawn from N(0, this) instead of PyTorch's Conv1d default (std ~0.29 at
    # width 4); FLA's models use 0.02 (its only initialisation that differs from ours)
    conv_init_std: float | None = None
    attention_head_dim: int = 64
    gsa_backend: str = "auto"

    # the options given on top of the sweep's profile (by `with_overrides`): what makes a run a variant
    overridden: tuple[str, ...] = ()

    def variant(self, model: str) -> str:
        """The options `model` was built with that were given on top of its profile's ("" for none), e.g.
        "gate_damping=32": such runs are a model of their own in tables, apart from (and never merged with) the
        profile's runs."""
        relevant = {"attention": ("attention_head_dim",), "fla-gla": ("gsa_head_dim", "short_conv")}.get(
            model, ("gsa_head_dim", "num_slots", "short_conv", "gate_damping", "conv_init_std"))  # what each uses
        values = {name: getattr(self, name) for name in relevant if name in self.overridden}
        return ", ".join(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
                         for name, value in values.items())


def run_label(record: dict) -> str:
    """A run's model as tables show it: its kind, and its non-default options when it has any."""
    variant = record.get("variant")
    return f"{record['model']} ({variant})" if variant else record["model"]


@dataclass(frozen=True)
class MQARRun:
    model: str
    width: int
    lr: float
    seed: int


@dataclass(frozen=True)
class Sweep:
    task: MQARTask
    train: TrainSettings
    models: tuple[str, ...]
    widths: tuple[int, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    options: ModelOptions = field(default_factory=ModelOptions)
    # training seconds of the whole sweep: each run gets budget * workers / runs (bounds the sweep's length)
    time_budget_seconds: float | None = None

    def __post_init__(self):
        unknown = [m for m in self.models if m not in MODEL_BUILDERS]
        if unknown:
            raise ValueError(f"unknown MQAR models {unknown}; expected some of {', '.join(MODEL_BUILDERS)}")
        if not (self.models and self.widths and self.lrs and self.seeds):
            raise ValueError("a sweep needs at least one model, width, learning rate and seed")
        bad = [w for w in self.widths if w < 1]
        if bad or any(lr <= 0 for lr in self.lrs):
            raise ValueError(f"widths and learning rates must be positive, got widths {self.widths}, lrs {self.lrs}")
        if self.time_budget_seconds is not None and self.time_budget_seconds <= 0:
            raise ValueError(f"time_budget_seconds must be > 0, got {self.time_budget_seconds}")

    def runs(self) -> list[MQARRun]:
        """Widest models first, so the longest runs start early and workers finish together."""
        runs = [
            MQARRun(model, width, lr, seed)
            for width in sorted(self.widths, reverse=True)
            for model in self.models
            for lr in self.lrs
            for seed in self.seeds
        ]
        return runs

    def as_dict(self) -> dict:
        return {
            "task": self.task.as_dict(),
            "train": asdict(self.train),
            "models": list(self.models),
            "widths": list(self.widths),
            "lrs": list(self.lrs),
            "seeds": list(self.seeds),
            "options": asdict(self.options),
            "time_budget_seconds": self.time_budget_seconds,
        }

    def train_settings(self, workers: int) -> TrainSettings:
        """The training settings with the time budget shared out: runs go `workers` at a time."""
        if self.time_budget_seconds is None:
            return self.train
        runs = len(self.runs())
        waves = math.ceil(runs / max(1, min(workers, runs)))  # runs go min(workers, runs) at a time, in whole waves
        share = self.time_budget_seconds / waves
        cap = share if self.train.max_train_seconds is None else min(share, self.train.max_train_seconds)
        return replace(self.train, max_train_seconds=cap)


# Named configurations. "gpu" is the paper's task (Fig. 3a) sized for one ~7-minute call on one H200: 16 runs
# (2 models x 4 widths x 2 learning rates), 8 worker processes, 300 s of training for the whole sweep (150 s a run,
# warm-up and testing not counted); 50000 steps (Zoology's 64 epochs of 100K examples at batch 128) is only a cap,
# the budget decides. "cpu" is a small task of the same kind that both models learn in minutes on 2 cores
# (--workers 2); "smoke" checks the plumbing in seconds.
PROFILES: dict[str, Sweep] = {
    "gpu": Sweep(
        task=MQARTask(vocab_size=8192, seq_len=512, num_pairs=64),
        train=TrainSettings(steps=50000, batch_size=128, eval_every=200, validation_examples=512, test_examples=1000),
        models=("gsa", "attention"),
        widths=(64, 128, 256, 512),
        lrs=(3e-3, 1e-2),
        seeds=(0,),
        time_budget_seconds=300,
    ),
    "cpu": Sweep(
        task=MQARTask(vocab_size=256, seq_len=64, num_pairs=8),
        train=TrainSettings(steps=5000, batch_size=64, eval_every=50, test_examples=256),
        models=("gsa", "attention"),
        widths=(64,),
        lrs=(3e-3, 1e-2),
        seeds=(0,),
        time_budget_seconds=300,
    ),
    "smoke": Sweep(
        task=MQARTask(vocab_size=64, seq_len=32, num_pairs=4),
        train=TrainSettings(steps=4, batch_size=4, eval_every=2, validation_examples=8, test_examples=16),
        models=("gsa", "attention"),
        widths=(16,),
        lrs=(3e-3,),
        seeds=(0,),
        options=ModelOptions(gsa_head_dim=8, num_slots=8, attention_head_dim=8),
    ),
}


def build_model(kind: str, width: int, vocab_size: int, options: ModelOptions) -> torch.nn.Module:
    if kind not in MODEL_BUILDERS:
        raise ValueError(f"unknown MQAR model {kind!r}; expected one of {', '.join(MODEL_BUILDERS)}")
    return MODEL_BUILDERS[kind](width, vocab_size, asdict(options))


def _query_logits(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, num_queries: int):
    """Logits at the query positions only (the LM head over every position would cost more than the model), in
    order (example by example, position by position), and their targets.

    Every example holds exactly `num_queries` queries, so their positions come from a stable sort of the query
    mask: fixed shapes and no host sync (a boolean index, or the model's check of the token ids, would make every
    step wait for the device). The embeddings are looked up here for the same reason: MQAR's ids are in range.
    """
    embeds = model.get_input_embeddings()(inputs)
    hidden = model.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    queries = (targets != IGNORE_INDEX).to(torch.int32)
    positions = queries.argsort(dim=1, descending=True, stable=True)[:, :num_queries]  # ascending within a row
    hidden = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    logits = model.get_output_embeddings()(hidden.flatten(0, 1)).float()
    return logits, targets.gather(1, positions).flatten()


def _autocast(device: torch.device):
    if device.type == "cuda":
        # no cast cache: a captured step makes its own casts of the weights (a cached cast made outside the capture
        # would be replayed as a stale copy); MQAR's weights are small, so eager steps lose nothing that matters
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return torch.autocast("cpu", enabled=False)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def accuracy(
    model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, num_queries: int
) -> float:
    """Fraction of query positions whose argmax prediction is the key's value."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=inputs.device)
    total = 0
    for start in range(0, len(inputs), batch_size):
        with _autocast(inputs.device):
            batch = slice(start, start + batch_size)
            logits, wanted = _query_logits(model, inputs[batch], targets[batch], num_queries)
        correct += (logits.argmax(-1) == wanted).sum()
        total += wanted.numel()
    model.train(was_training)
    return int(correct) / total


def _learning_rate(progress: float, settings: TrainSettings, peak: float) -> float:
    """Linear warm-up, then cosine decay to zero, over training progress in [0, 1]."""
    if progress < settings.warmup_fraction:
        return peak * max(progress, 1e-3) / settings.warmup_fraction  # the first step (progress 0) must move too
    decay = (progress - settings.warmup_fraction) / (1 - settings.warmup_fraction)
    return peak * 0.5 * (1 + math.cos(math.pi * min(decay, 1.0)))


def learning_rates(planned_steps: int, settings: TrainSettings, peak: float) -> list[float]:
    """The learning rate of each step of a run of `planned_steps` steps: warm-up over the first
    warmup_fraction of them, cosine decay to zero over the rest."""
    return [_learning_rate(step / planned_steps, settings, peak) for step in range(planned_steps)]


def planned_steps(settings: TrainSettings, step_seconds: float | None, eval_seconds: float = 0.0) -> int:
    """How many steps a run takes: `settings.steps`, or fewer when a time budget is set and the measured step
    (plus its share of the validation passes) would overrun it. At least one."""
    if settings.max_train_seconds is None or step_seconds is None:
        return settings.steps
    per_step = step_seconds + eval_seconds / settings.eval_every
    if per_step <= 0:
        return settings.steps
    return max(1, min(settings.steps, int(settings.max_train_seconds / per_step)))


# A time-budgeted run compares its pace with its plan this many times; it re-plans when the projection is off by
# more than REPLAN_TOLERANCE of the plan (a device shared by several runs gets slower or faster as they come and go).
REPLAN_CHECKS = 20
REPLAN_TOLERANCE = 0.1
# Seeds of the batches that warm-up and calibration draw (never the training stream's, whose seed is the run's).
WARMUP_SEED = 3_000_017
CALIBRATION_SEED = 4_000_037


def _optimizer(model: torch.nn.Module, lr: float, settings: TrainSettings, device: torch.device, graphs: bool = False):
    """AdamW; for CUDA-graph steps capturable, with the learning rate a device tensor (refilled before each replay)."""
    return torch.optim.AdamW(
        model.parameters(), lr=torch.tensor(lr, device=device) if graphs else lr, betas=(0.9, 0.98),
        weight_decay=settings.weight_decay, fused=device.type == "cuda", capturable=graphs,
    )


def _batch_loss(model, task: MQARTask, batch_size: int, stream, device) -> torch.Tensor:
    """Cross-entropy at the query positions of a fresh training batch of `task`."""
    inputs, targets = task.sample(batch_size, stream)
    return _loss(model, task, inputs, targets, device)


def _loss(model, task: MQARTask, inputs: torch.Tensor, targets: torch.Tensor, device) -> torch.Tensor:
    with _autocast(device):
        logits, wanted = _query_logits(model, inputs, targets, task.num_pairs)
    return F.cross_entropy(logits, wanted)


class _Mixture:
    """The training batches of a run: the sizes of `training_mixture` in turn, each batch as many tokens as
    `settings.batch_size` examples of the target."""

    def __init__(self, task: MQARTask, settings: TrainSettings):
        self.tasks = training_mixture(task, settings.mixture_levels)
        self.batch_sizes = [settings.batch_size * task.seq_len // t.seq_len for t in self.tasks]

    def __len__(self) -> int:
        return len(self.tasks)

    def batch(self, step: int, stream) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(the size's index, inputs, targets) of step `step`'s fresh batch."""
        i = step % len(self.tasks)
        return (i, *self.tasks[i].sample(self.batch_sizes[i], stream))

    def loss(self, model, step: int, stream, device) -> torch.Tensor:
        i = step % len(self.tasks)
        return _batch_loss(model, self.tasks[i], self.batch_sizes[i], stream, device)


def _update(model, optimizer, loss: torch.Tensor) -> None:
    """Backward, clipping at norm 1, AdamW: no host sync anywhere (so it can be captured)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def _train_step(model, optimizer, mixture: _Mixture, step: int, stream, device, lr: float):
    """One optimizer step on a fresh batch; returns the loss (a device tensor: reading it would sync)."""
    _set_lr(optimizer, lr)
    loss = mixture.loss(model, step, stream, device)
    _update(model, optimizer, loss)
    return loss.detach()


def _snapshot(model, optimizer) -> Callable[[], None]:
    """A function that puts the parameters, buffers and the optimizer's state back as they are now, in place
    (captured graphs keep pointing at the same tensors); state the optimizer creates later is zeroed, which is
    AdamW's fresh state (moments and step count 0)."""
    tensors = [*model.parameters(), *model.buffers()]
    copies = [t.detach().clone() for t in tensors]
    state = {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in optimizer.state[p].items()}
             for p in model.parameters() if p in optimizer.state}

    def restore() -> None:
        with torch.no_grad():
            for t, saved in zip(tensors, copies):
                t.copy_(saved)
            for p in model.parameters():
                kept = state.get(id(p), {})
                for key, value in optimizer.state.get(p, {}).items():
                    if not isinstance(value, torch.Tensor):
                        continue
                    if key in kept:
                        value.copy_(kept[key])
                    else:
                        value.zero_()
        model.zero_grad(set_to_none=True)

    return restore


class _GraphedSteps:
    """`_train_step` with each training size's step captured once as a CUDA graph and replayed: the batch is drawn
    as the eager step draws it (same stream, same examples), copied into the graph's inputs, the learning rate
    refilled, and one graph launch runs forward, backward, clipping and AdamW. Capturing warms up on a side stream
    (which trains), so the parameters and optimizer state are put back afterwards: the run is the eager run's up to
    float rounding. A size whose capture fails trains eagerly (`failed` says why)."""

    def __init__(self, model, optimizer, mixture: _Mixture, device: torch.device):
        self.model, self.optimizer, self.mixture, self.device = model, optimizer, mixture, device
        self.graphs: list = [None] * len(mixture)
        self.failed: str | None = None

    def __call__(self, step: int, stream, lr: float) -> torch.Tensor:
        i, inputs, targets = self.mixture.batch(step, stream)
        _set_lr(self.optimizer, lr)
        if self.graphs[i] is None and self.failed is None:
            self.graphs[i] = self._capture(i, inputs, targets)
        if self.graphs[i] is None:  # eager, as _train_step
            loss = _loss(self.model, self.mixture.tasks[i], inputs, targets, self.device)
            _update(self.model, self.optimizer, loss)
            return loss.detach()
        graph, static_inputs, static_targets, loss = self.graphs[i]
        static_inputs.copy_(inputs)
        static_targets.copy_(targets)
        graph.replay()
        return loss  # the graph's own output: it holds this size's latest loss

    def _capture(self, i: int, inputs: torch.Tensor, targets: torch.Tensor):
        restore = _snapshot(self.model, self.optimizer)
        static_inputs, static_targets = inputs.clone(), targets.clone()
        task = self.mixture.tasks[i]

        def body() -> torch.Tensor:
            loss = _loss(self.model, task, static_inputs, static_targets, self.device)
            _update(self.model, self.optimizer, loss)
            return loss.detach()

        stream = None
        try:
            stream = torch.cuda.current_stream(self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # kernels compiled, optimizer state made, allocations settled
                    body()
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)  # the captured backward makes the graph's own gradients
            with torch.cuda.graph(graph):
                loss = body()
        except Exception as error:  # noqa: BLE001 - any capture failure leaves eager steps, which always work
            self.failed = f"{type(error).__name__}: {error}"
            if stream is not None:  # a capture that fails as it ends can leave its own stream current
                torch.cuda.set_stream(stream)
            _synchronize(self.device)
            restore()
            return None
        restore()
        return graph, static_inputs, static_targets, loss


def _warm_up(model, task: MQARTask, mixture: _Mixture, settings: TrainSettings, validation, device) -> None:
    """One forward and backward pass per training size and one evaluation batch: what runs once per process and
    shape (Triton compilation of the GSA kernels, cuBLAS and allocator set-up) happens here, outside the time
    budget. Changes no parameter, no optimizer state and no random stream of the run."""
    generator = torch.Generator(device=device).manual_seed(WARMUP_SEED)
    for i in range(len(mixture)):
        mixture.loss(model, i, generator, device).backward()
    model.zero_grad(set_to_none=True)
    batch = min(settings.eval_batch_size, len(validation[0]))
    accuracy(model, validation[0][:batch], validation[1][:batch], settings.eval_batch_size, task.num_pairs)
    _synchronize(device)


def _time_steps(
    stepper, restore_point, task: MQARTask, mixture: _Mixture, settings: TrainSettings, validation, model, clock,
    lr: float, device,
) -> tuple[float, float]:
    """(seconds per training step, seconds per validation pass), measured on throwaway steps over whole turns of
    the mixture, after one untimed turn (the optimizer's first steps; each size's graph captured): the parameters
    and optimizer state are put back afterwards (`restore_point`), so the run trains exactly as a step-count run of
    its planned length."""
    generator = torch.Generator(device=device).manual_seed(CALIBRATION_SEED)
    for step in range(len(mixture)):
        stepper(step, generator, lr)
    _synchronize(device)
    steps = len(mixture) * math.ceil(settings.calibration_steps / len(mixture))
    start = clock()
    for step in range(steps):
        stepper(step, generator, lr)
    _synchronize(device)
    step_seconds = (clock() - start) / steps
    start = clock()
    accuracy(model, *validation, settings.eval_batch_size, task.num_pairs)
    eval_seconds = clock() - start
    restore_point()
    return step_seconds, eval_seconds


def train_and_test(
    run: MQARRun, task: MQARTask, settings: TrainSettings, options: ModelOptions, device: str | torch.device,
    clock: Callable[[], float] = time.perf_counter,
) -> dict:
    """Train one model on `task` (on the mixture of its sizes that `settings.mixture_levels` asks for) and return
    its test accuracy on `task` with how it got there.

    Every run first warms up (one forward/backward and one evaluation batch: kernel compilation and allocation
    happen there, before any clock starts, and change nothing the run computes). Without a time budget the run
    takes `settings.steps` steps (fewer if it reaches `stop_accuracy`), exactly reproducible. With one, it times
    a few throwaway steps (parameters restored afterwards) and plans the steps that fit in the budget; the
    learning-rate schedule (warm-up, cosine decay) spans the plan, so the run is the same as a step-count run of
    that length. If its pace drifts more than REPLAN_TOLERANCE from the plan (a device shared with other runs),
    the plan, and with it the rest of the schedule, follows the pace; `overrun` x the budget is a hard stop.
    With `sitting_seconds` (and no budget) it trains at most that long, saves its state under `checkpoint_dir` and
    returns `stopped: "sitting"`; the next call continues it from there (gsa.eval.mqar_sittings). `clock` is for
    tests.
    """
    device = torch.device(device)
    sittings = None
    if settings.checkpoint_dir is not None:
        sittings = RunSittings(settings.checkpoint_dir, run, task, settings, options, device)
        finished = sittings.finished_result()
        if finished is not None:
            return finished
    torch.manual_seed(run.seed)
    model = build_model(run.model, run.width, task.vocab_size, options).to(device).train()
    validation = mqar_examples(task, settings.validation_examples, VALIDATION_SEED, device)
    mixture = _Mixture(task, settings)
    warm_start = clock()
    _warm_up(model, task, mixture, settings, validation, device)
    graphs = settings.cuda_graphs and device.type == "cuda"
    optimizer = _optimizer(model, run.lr, settings, device, graphs)
    stream = torch.Generator(device=device).manual_seed(run.seed)
    resumed = sittings.load(model, optimizer, stream) if sittings is not None else None
    if graphs:  # captured after the state is loaded: capturing puts back the state it finds
        stepper = _GraphedSteps(model, optimizer, mixture, device)
    else:
        def stepper(step, stream, lr):
            return _train_step(model, optimizer, mixture, step, stream, device, lr)
    step_seconds = eval_seconds = None
    if settings.max_train_seconds is not None:
        # the schedule's first rate: the model stays near its start
        step_seconds, eval_seconds = _time_steps(
            stepper, _snapshot(model, optimizer), task, mixture, settings, validation, model, clock,
            _learning_rate(0.0, settings, run.lr), device,
        )
    plan = first_plan = planned_steps(settings, step_seconds, eval_seconds or 0.0)
    warmup_seconds = clock() - warm_start
    budget = settings.max_train_seconds
    history, replans = [], []
    stopped = "planned steps"
    step, earlier_seconds, sitting = 0, 0.0, 1
    latest = [None] * len(mixture)  # the last step's loss on each training size (device tensors)
    if resumed is not None:
        step, history, earlier_seconds = resumed["step"], resumed["history"], resumed["train_seconds"]
        sitting = resumed["sittings"] + 1
        latest = [None if loss is None else torch.tensor(loss) for loss in resumed["latest_losses"]]
    next_check = None if budget is None else budget / REPLAN_CHECKS
    started = clock()
    while step < plan:
        lr = _learning_rate(step / plan, settings, run.lr)
        latest[step % len(mixture)] = stepper(step, stream, lr)
        step += 1
        overrun = False
        if budget is not None:
            elapsed = clock() - started
            overrun = elapsed > settings.overrun * budget
            if not overrun and elapsed >= next_check:
                # the pace so far (a shared device can be slower than at calibration): re-plan when it is off
                next_check = elapsed + budget / REPLAN_CHECKS
                projected = min(settings.steps, step + int(max(0.0, budget - elapsed) * step / elapsed))
                if abs(projected - plan) > REPLAN_TOLERANCE * plan:
                    plan = projected
                    replans.append({"step": step, "seconds": round(elapsed, 2), "planned_steps": plan})
        if step % settings.eval_every == 0 or step >= plan or overrun:
            val = accuracy(model, *validation, settings.eval_batch_size, task.num_pairs)
            losses = [loss.item() for loss in latest if loss is not None]
            # "loss": the target size's last training loss; "size_losses": every size's, target first
            history.append({"step": step, "lr": lr, "loss": losses[0], "size_losses": losses,
                            "validation_accuracy": val})
            if not all(math.isfinite(loss) for loss in losses):
                stopped = "non-finite loss"
            elif val >= settings.stop_accuracy:
                stopped = "stop accuracy"
            elif overrun:
                stopped = "overrun"
            if stopped != "planned steps":
                break
        if settings.sitting_seconds is not None and step < plan and clock() - started >= settings.sitting_seconds:
            stopped = "sitting"  # saved below; the same sweep again continues from this step
            break
    _synchronize(device)
    train_seconds = earlier_seconds + clock() - started
    test = accuracy(
        model, *mqar_examples(task, settings.test_examples, TEST_SEED, device), settings.eval_batch_size,
        task.num_pairs,
    )
    result = {
        **asdict(run),
        "accuracy": test,
        "steps": step,
        "planned_steps": plan,
        "stopped": stopped,
        "reached_stop_accuracy": bool(history) and history[-1]["validation_accuracy"] >= settings.stop_accuracy,
        "final_validation_accuracy": history[-1]["validation_accuracy"] if history else None,
        "train_seconds": round(train_seconds, 2),
        "steps_per_second": round(step / train_seconds, 2) if train_seconds > 0 else None,
        "warmup_seconds": round(warmup_seconds, 2),
        "calibrated_step_seconds": None if step_seconds is None else round(step_seconds, 5),
        "calibrated_eval_seconds": None if eval_seconds is None else round(eval_seconds, 5),
        "first_planned_steps": first_plan,
        "replans": replans,
        "max_train_seconds": settings.max_train_seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
        "training_sizes": [[t.seq_len, t.num_pairs, b] for t, b in zip(mixture.tasks, mixture.batch_sizes)],
        # training sizes whose steps replayed a CUDA graph (of training_sizes); cuda_graph_failure: why a capture
        # failed (that size and those not yet captured then ran eagerly)
        "cuda_graph_sizes": sum(g is not None for g in stepper.graphs) if graphs else 0,
        "cuda_graph_failure": stepper.failed if graphs else None,
        "sittings": sitting,
        "history": history,
    }
    if sittings is not None and stopped == "sitting":
        sittings.save(model, optimizer, stream, step, {
            "step": step, "history": history, "train_seconds": train_seconds, "sittings": sitting,
            "latest_losses": [None if loss is None else loss.item() for loss in latest]})
    elif sittings is not None:
        sittings.finish(result)
    return result


def _recorded_run(run: MQARRun, task: MQARTask, settings: TrainSettings, options: ModelOptions, device) -> dict:
    """train_and_test, with a failure (a width the heads do not divide, out of memory, a kernel error) recorded
    in the result instead of ending the whole sweep."""
    try:
        result = train_and_test(run, task, settings, options, device)
    except Exception as error:  # noqa: BLE001  (any failure of one run is reported with that run)
        result = {**asdict(run), "accuracy": None, "error": f"{type(error).__name__}: {error}"}
    # the task and variant: so runs of several sweeps can be merged into one table (--merge)
    return {**result, "variant": options.variant(run.model), "task": asdict(task), "device": str(device)}


def worker_devices(device: str | torch.device, workers: int, gpu_count: int) -> list[str]:
    """The device of each worker process: a bare `cuda` with several GPUs visible spreads the workers over them,
    worker i on GPU i mod gpu_count (one run per GPU when workers = gpu_count); any other device (cpu, cuda:1,
    a single GPU) is every worker's."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and gpu_count > 1:
        return [f"cuda:{i % gpu_count}" for i in range(workers)]
    return [str(device)] * workers


_WORKER_DEVICE: str | None = None  # a pool process's device, taken once from the queue of `worker_devices`


def _init_worker(devices, fallback: str) -> None:
    global _WORKER_DEVICE
    try:  # (waits: the parent's queue feeds the pipe from a thread, so an item may not be there at once)
        _WORKER_DEVICE = devices.get(timeout=30)
    except queue.Empty:  # only a process the pool starts in place of one that died finds the queue empty (its
        # lost run is then lost to the sweep as well): it gets the sweep's device, which may double up a GPU
        _WORKER_DEVICE = fallback


def _worker_run(job: tuple) -> dict:
    run, task, settings, options, threads = job
    torch.set_num_threads(threads)
    if _WORKER_DEVICE.startswith("cuda:"):
        torch.cuda.set_device(_WORKER_DEVICE)  # what lands on "cuda" without an index (CUDA graphs' pools) too
    return _recorded_run(run, task, settings, options, _WORKER_DEVICE)


def run_sweep(
    sweep: Sweep, device: str | torch.device, workers: int = 1, on_result: Callable[[dict], None] | None = None
) -> list[dict]:
    """Every run of the sweep; with workers > 1 they go to that many spawned processes sharing `device` (a bare
    "cuda" with several GPUs visible: spread over them, see `worker_devices`)."""
    if any(m.startswith("fla-") for m in sweep.models) and not fla_available():  # (a merge of results needs none)
        raise ValueError("models fla-gsa / fla-gla need flash-linear-attention (pip install flash-linear-attention)")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    runs = sweep.runs()
    settings = sweep.train_settings(workers)
    results = []
    if workers == 1:
        for run in runs:
            results.append(_recorded_run(run, sweep.task, settings, sweep.options, device))
            if on_result:
                on_result(results[-1])
        return results
    threads = max(1, (os.cpu_count() or 1) // workers)
    jobs = [(run, sweep.task, settings, sweep.options, threads) for run in runs]
    context = torch.multiprocessing.get_context("spawn")
    processes = min(workers, len(jobs))
    gpu_count = torch.cuda.device_count() if torch.device(device).type == "cuda" else 0
    devices = context.Queue()
    for worker_device in worker_devices(device, processes, gpu_count):
        devices.put(worker_device)
    with context.Pool(processes, initializer=_init_worker, initargs=(devices, str(device))) as pool:
        for result in pool.imap_unordered(_worker_run, jobs):
            results.append(result)
            if on_result:
                on_result(result)
    return results


def load_runs(paths: Iterable[str | os.PathLike], task: MQARTask) -> list[dict]:
    """The runs recorded in mqar.json or mqar.runs.jsonl files (sweeps split over GPUs or calls), checked to be
    of `task`: by their task where recorded, else by their target size (the first of their training sizes)."""
    runs, seen = [], {}
    for path in map(Path, paths):
        if not path.is_file():
            raise ValueError(f"--merge: {path} is not a file (expected an mqar.json or mqar.runs.jsonl)")
        text = path.read_text(encoding="utf-8")
        try:
            records = json.loads(text)["runs"] if path.suffix == ".json" else [
                json.loads(line) for line in text.splitlines() if line.strip()]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"--merge: {path} holds no MQAR runs ({error})") from None
        for record in records:
            recorded = record.get("task")
            target = record.get("training_sizes", [[None, None]])[0][:2]
            if recorded is not None and recorded != asdict(task) or recorded is None and target != [
                    task.seq_len, task.num_pairs]:
                found = recorded or f"seq_len {target[0]}, num_pairs {target[1]}"
                raise ValueError(f"--merge: a run in {path} is of another task ({found}); expected {asdict(task)}"
                                 " (give the sweep's --seq-len, --num-pairs and --vocab-size)")
            key = (run_label(record), record["width"], record["lr"], record["seed"])
            if key in seen:
                raise ValueError(f"--merge: the run {run_label(record)} d={record['width']} lr={record['lr']:g} "
                                 f"seed={record['seed']} is in both {seen[key]} and {path} (an mqar.json and its own "
                                 "mqar.runs.jsonl hold the same runs: give one of them)")
            seen[key] = path
            runs.append(record)
    return runs


def summarize(results: Iterable[dict]) -> dict:
    """model -> width -> the best learning rate's mean accuracy over seeds (and every learning rate's); runs that
    failed are left out."""
    grouped: dict[str, dict[int, dict[float, list[float]]]] = {}
    for r in results:
        if r.get("error"):
            continue
        grouped.setdefault(run_label(r), {}).setdefault(r["width"], {}).setdefault(r["lr"], []).append(r["accuracy"])
    summary = {}
    for model, widths in grouped.items():
        summary[model] = {}
        for width, by_lr in sorted(widths.items()):
            means = {lr: sum(accs) / len(accs) for lr, accs in by_lr.items()}
            best = max(means, key=means.get)
            summary[model][width] = {
                "accuracy": means[best],
                "best_lr": best,
                "seed_accuracies": by_lr[best],
                "accuracy_by_lr": {str(lr): mean for lr, mean in sorted(means.items())},
            }
    return summary


def format_table(summary: dict, include_paper: bool) -> str:
    """Accuracy (%) by model and width, one row per model, the paper's rows underneath when asked."""
    rows = [(model, {w: v["accuracy"] * 100 for w, v in by_width.items()}) for model, by_width in summary.items()]
    if include_paper:
        rows += list(PAPER_ACCURACY.items())
    widths = sorted({w for _, values in rows for w in values})  # the paper's widths too, where its rows are shown
    name_width = max(len("model"), *(len(name) for name, _ in rows))
    header = f"{'model':<{name_width}}" + "".join(f"{'d=' + str(w):>9}" for w in widths)
    lines = [header, "-" * len(header)]
    for name, values in rows:
        cells = "".join(f"{values[w]:>9.1f}" if w in values else f"{'-':>9}" for w in widths)
        lines.append(f"{name:<{name_width}}{cells}")
    return "\n".join(lines)


def is_paper_setting(task: MQARTask) -> bool:
    """Fig. 3a's task (seq 512, 64 pairs), where the paper's values are the reference."""
    return (task.seq_len, task.num_pairs) == (512, 64)


def paper_comparison(summary: dict) -> list[str]:
    """Our `gsa` against the paper's GSA at each of its widths; the target is at least the paper's accuracy."""
    ours = summary.get("gsa", {})
    lines = []
    for width, paper in PAPER_ACCURACY["GSA (paper)"].items():
        if width not in ours:
            lines.append(f"d={width}: not run (paper {paper}%)")
            continue
        accuracy = 100 * ours[width]["accuracy"]
        verdict = "at least the paper's" if accuracy >= paper else "below the paper's"
        lines.append(f"d={width}: gsa {accuracy:.1f}% vs paper {paper}%: {verdict}")
    return lines


def report_text(sweep: Sweep, summary: dict, seconds: float | None) -> str:
    """The table (and, at the paper's setting, the comparison with its GSA values) as mqar.md holds it."""
    task = sweep.task
    lines = [
        f"# MQAR: seq {task.seq_len}, {task.num_pairs} pairs, vocab {task.vocab_size}",
        "",
        f"Accuracy (%) of the best learning rate per cell (lrs {', '.join(f'{lr:g}' for lr in sweep.lrs)}; seeds "
        f"{', '.join(map(str, sweep.seeds))}); "
        + (f"{seconds:.0f} s in all." if seconds is not None else "runs of several sweeps, merged."),
        "",
        "```",
        format_table(summary, include_paper=is_paper_setting(task)),
        "```",
    ]
    if is_paper_setting(task):
        lines += ["", "Target, our GSA at least the paper's at every width:", ""]
        lines += [f"- {line}" for line in paper_comparison(summary)]
    return "\n".join(lines) + "\n"


def plot_accuracy_by_width(summary: dict, path, title: str, include_paper: bool) -> None:
    """The paper's Fig. 3a: accuracy (%) against model width, one line per model (paper's values dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for model, by_width in summary.items():
        widths = sorted(by_width)
        ax.plot(widths, [by_width[w]["accuracy"] * 100 for w in widths], marker="o", label=model)
    if include_paper:
        for name, values in PAPER_ACCURACY.items():
            widths = sorted(values)
            ax.plot(widths, [values[w] for w in widths], linestyle="--", marker="x", alpha=0.6, label=name)
    all_widths = sorted({w for by_width in summary.values() for w in by_width})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_widths, [str(w) for w in all_widths])
    ax.set_ylim(-2, 102)
    ax.set_xlabel("Model dimension")
    ax.set_ylabel("Accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def with_overrides(sweep: Sweep, **overrides) -> Sweep:
    """The sweep with some fields replaced; task/train/options fields may be given by their own names."""
    task_fields = {k: overrides.pop(k) for k in list(overrides) if k in MQARTask.__dataclass_fields__}
    train_fields = {k: overrides.pop(k) for k in list(overrides) if k in TrainSettings.__dataclass_fields__}
    option_fields = {k: overrides.pop(k) for k in list(overrides) if k in ModelOptions.__dataclass_fields__}
    changed = [k for k, v in option_fields.items() if v != getattr(sweep.options, k) and k != "overridden"]
    option_fields.setdefault("overridden", tuple(dict.fromkeys((*sweep.options.overridden, *changed))))
    return replace(
        sweep,
        task=replace(sweep.task, **task_fields),
        train=replace(sweep.train, **train_fields),
        options=replace(sweep.options, **option_fields),
        **overrides,
    )
