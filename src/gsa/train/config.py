"""What a training run is: one `TrainConfig`, from a recipe, a TOML file and command-line flags (later ones win).

The TOML file uses the sections below (`[model]`, `[data]`, ...) or plain top-level keys, plus an optional
top-level `recipe = "NAME"` to start from. Every field is also a flag (`seq_len` is `--seq-len`), except
`model_overrides`, a table of GSAConfig fields, which only a file can give. `docs/training.md` shows a full file.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _field(default, section: str, help: str, **kwargs):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"section": section, "help": help},
                     **kwargs)
    return field(default=default, metadata={"section": section, "help": help}, **kwargs)


@dataclass
class TrainConfig:
    # [model]
    model: str = _field("gsa-tiny", "model", "model preset (gsa-1.3b, gsa-100m, transformer-100m, gsa-tiny, ...)")
    model_overrides: dict = _field({}, "model", "GSAConfig fields that change the preset (TOML only)")
    init_from: str | None = _field(None, "model", "start from the weights in this model folder (e.g. for T2R)")
    activation_checkpointing: bool = _field(False, "model", "recompute each block's activations in backward")
    keep_features: bool = _field(False, "model", "keep the GSA layers' φ(q), φ(k), swish(v) and the norms' outputs "
                                 "for backward instead of recomputing them: a little faster, 6 x width more values a "
                                 "token and block (false leaves the model's own recompute_features setting as it is)")
    keep_states: bool = _field(False, "model", "keep the GSA operator's chunk states from forward for backward "
                               "instead of computing them again (GPU): one state pass fewer a step for (T / 64 + 1) x "
                               "heads x (K + V) x slots more values a sequence and layer; no effect on the CPU's torch "
                               "backend (false leaves the model's own recompute_states setting as it is)")
    keep_norms: bool = _field(False, "model", "keep the norms' outputs for backward (not the features, unless "
                              "keep_features): 3 x width more values a token and block; with keep_states 34 GiB at "
                              "the 1.3B shape (false leaves the model's own recompute_norms setting as it is)")
    # [data]
    data: list = _field(["shakespeare"], "data", "corpus names (shakespeare, bible-kjv, gcide), files or folders")
    text_field: str = _field("text", "data", "the text field of JSON-lines files and saved datasets")
    tokenizer: str = _field("auto", "data", "bytes, mistral, a .model file or a tokenizer folder; auto: the "
                            "--init-from folder's tokenizer, else bytes")
    seq_len: int = _field(256, "data", "tokens per training sequence")
    val_fraction: float = _field(0.02, "data", "share of the corpus held out for validation")
    pack_documents: bool = _field(True, "data", "reset the model state at every document start (cu_seqlens)")
    cache_dir: str | None = _field(None, "data", "token cache folder (default ~/.cache/gsa/tokens)")
    # [batch]
    batch_size: int = _field(16, "batch", "sequences per process per micro-batch")
    grad_accum: int | None = _field(None, "batch", "micro-batches per optimizer step (default: from "
                                    "global_batch_size, else 1)")
    global_batch_size: int | None = _field(None, "batch", "sequences per optimizer step over all processes")
    # [optimizer]
    lr: float = _field(3e-4, "optimizer", "peak learning rate")
    min_lr: float = _field(3e-5, "optimizer", "learning rate at the end of the cosine decay")
    weight_decay: float = _field(0.01, "optimizer", "AdamW weight decay (not on norms, biases, embeddings)")
    beta1: float = _field(0.9, "optimizer", "AdamW beta1")
    beta2: float = _field(0.95, "optimizer", "AdamW beta2")
    eps: float = _field(1e-8, "optimizer", "AdamW epsilon")
    grad_clip: float = _field(1.0, "optimizer", "clip the gradient norm to this (0: no clipping)")
    # [schedule]
    steps: int = _field(1000, "schedule", "optimizer steps in the run")
    warmup_steps: int | None = _field(None, "schedule", "linear warm-up steps, at most steps (default: from "
                                      "warmup_tokens, else 1%% of steps)")
    warmup_tokens: int | None = _field(None, "schedule", "warm-up length in tokens, turned into steps")
    # [eval]
    eval_every: int = _field(200, "eval", "validate every this many steps (and at the end)")
    eval_windows: int = _field(128, "eval", "validation sequences read each time (at most)")
    log_every: int = _field(10, "eval", "write training metrics every this many steps")
    sample_prompt: str = _field("\n", "eval", "prompt of the sample generation at the end")
    sample_tokens: int = _field(300, "eval", "tokens generated at the end (0: none)")
    sample_temperature: float = _field(0.8, "eval", "sampling temperature of the generation at the end")
    # [checkpoint]
    name: str | None = _field(None, "checkpoint", "run name (default: the recipe name and the start time)")
    run_dir: str | None = _field(None, "checkpoint", "run folder (default runs/NAME)")
    save_every: int = _field(500, "checkpoint", "write a checkpoint every this many steps (and at the end)")
    keep_last: int = _field(2, "checkpoint", "checkpoints kept (older ones are deleted)")
    resume: str | None = _field(None, "checkpoint", "continue a run: 'latest' (of --run-dir/--name), a run "
                                "folder or a checkpoint folder")
    # [system]
    device: str = _field("auto", "system", "auto (CUDA when present), cpu or cuda")
    precision: str = _field("auto", "system", "auto (bf16 on GPU, fp32 on CPU), bf16 or fp32")
    compile: bool = _field(False, "system", "torch.compile each block")
    parallel: str = _field("auto", "system", "what manages the model: auto (fsdp on several processes and on one "
                           "GPU in bf16: bf16 compute over float32 master weights; none on one CPU), fsdp, ddp or "
                           "none (one GPU: float32 weights under bf16 autocast)")
    threads: int = _field(0, "system", "CPU threads (0: the cores other work leaves idle at the start, or "
                          "OMP_NUM_THREADS when set)")
    seed: int = _field(0, "system", "seed of the initial weights and of the data order")
    progress: bool = _field(True, "system", "show a progress bar")
    recipe: str | None = _field(None, "system", "the recipe these settings started from")

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the setting that cannot describe a run."""

        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(f"invalid training setting: {message}")

        for name in ("seq_len", "batch_size", "steps", "eval_every", "log_every", "save_every", "keep_last"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("grad_accum", "global_batch_size", "warmup_tokens"):
            value = getattr(self, name)
            need(value is None or value >= 1, f"{name} must be >= 1, got {value}")
        need(self.warmup_steps is None or self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.warmup_steps is None or self.warmup_tokens is None, "give warmup_steps or warmup_tokens, not both")
        need(self.lr > 0 and 0 <= self.min_lr <= self.lr, f"need 0 <= min_lr <= lr and lr > 0, got lr {self.lr}, "
             f"min_lr {self.min_lr}")
        need(self.weight_decay >= 0 and self.grad_clip >= 0, "weight_decay and grad_clip must be >= 0")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps > 0, "need 0 <= beta1, beta2 < 1 and eps > 0")
        need(0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        need(self.eval_windows >= 1, f"eval_windows must be >= 1, got {self.eval_windows}")
        need(self.threads >= 0, f"threads must be >= 0 (0: automatic), got {self.threads}")
        need(self.sample_tokens >= 0 and self.sample_temperature >= 0, "sample_tokens and sample_temperature must "
             "be >= 0")
        need(isinstance(self.data, list) and self.data and all(isinstance(d, str) for d in self.data),
             f"data must be a non-empty list of corpus names, files or folders, got {self.data!r}")
        need(isinstance(self.model_overrides, dict), f"model_overrides must be a table, got {self.model_overrides!r}")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"device must be auto, cpu or cuda, got {self.device!r}")
        need(self.precision in ("auto", "bf16", "fp32"),
             f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        need(self.parallel in ("auto", "fsdp", "ddp", "none"),
             f"parallel must be auto, fsdp, ddp or none, got {self.parallel!r}")
        return self

    def batch_layout(self, world_size: int) -> tuple[int, int]:
        """(gradient accumulation steps, global batch in sequences) for this many processes."""
        per_micro_step = self.batch_size * world_size
        if self.global_batch_size is None:
            accum = self.grad_accum or 1
            return accum, per_micro_step * accum
        if self.global_batch_size % per_micro_step:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of batch_size {self.batch_size} x "
                f"{world_size} processes = {per_micro_step}; change --batch-size or --global-batch-size"
            )
        accum = self.global_batch_size // per_micro_step
        if self.grad_accum is not None and self.grad_accum != accum:
            raise ValueError(
                f"grad_accum {self.grad_accum} disagrees with global_batch_size {self.global_batch_size} = batch_size "
                f"{self.batch_size} x {world_size} processes x {accum}; give one of them"
            )
        return accum, self.global_batch_size

    def warmup(self, tokens_per_step: int) -> int:
        """Warm-up steps (never more than the run's steps)."""
        if self.warmup_steps is not None:
            return min(self.steps, self.warmup_steps)
        if self.warmup_tokens is not None:
            return min(self.steps, math.ceil(self.warmup_tokens / tokens_per_step))
        return max(1, self.steps // 100)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
SECTIONS = tuple(dict.fromkeys(f.metadata["section"] for f in FIELDS.values()))

# Named starting points. The embedded default trains in a few minutes on a 2-core CPU (measured in
# docs/training.md); the paper's recipe is spec §4 (100B tokens, 0.5M-token batches, 1B-token warm-up).
RECIPES: dict[str, dict[str, Any]] = {
    "shakespeare-tiny": dict(
        model="gsa-tiny", data=["shakespeare"], tokenizer="bytes", seq_len=128, batch_size=8, steps=480,
        lr=2e-3, min_lr=2e-4, warmup_steps=20, eval_every=120, eval_windows=96, log_every=10, save_every=240,
        keep_last=1, sample_prompt="KING.\n", sample_tokens=400,
    ),
    "gsa-100m": dict(
        model="gsa-100m", data=["shakespeare", "bible-kjv"], tokenizer="mistral", seq_len=2048, batch_size=16,
        steps=2000, lr=1e-3, min_lr=1e-4, warmup_steps=100, eval_every=250, eval_windows=64, save_every=1000,
        sample_prompt="ROMEO.\n", sample_tokens=120,
    ),
    "paper-1.3b": dict(
        model="gsa-1.3b", tokenizer="mistral", seq_len=2048, batch_size=8, global_batch_size=256,
        steps=190_735, warmup_tokens=1_000_000_000, lr=3e-4, min_lr=3e-5, weight_decay=0.01, grad_clip=1.0,
        eval_every=1000, eval_windows=256, save_every=1000, keep_last=3, sample_tokens=100,
    ),
    "paper-2.7b": dict(
        model="gsa-2.7b", tokenizer="mistral", seq_len=2048, batch_size=8, global_batch_size=256,
        steps=190_735, warmup_tokens=1_000_000_000, lr=3e-4, min_lr=3e-5, weight_decay=0.01, grad_clip=1.0,
        eval_every=1000, eval_windows=256, save_every=1000, keep_last=3, sample_tokens=100,
    ),
    # T2R (spec §5): continue a converted Transformer with a small constant-ish rate, every parameter trained
    "t2r": dict(
        seq_len=2048, batch_size=8, lr=3e-5, min_lr=3e-6, warmup_steps=100, steps=2000, eval_every=250,
        eval_windows=64, save_every=500, sample_tokens=100,
    ),
}
DEFAULT_RECIPE = "shakespeare-tiny"


# settings that say one thing two ways: a layer (recipe, file, flags) that gives one drops an earlier layer's other
EITHER_OR = (("warmup_steps", "warmup_tokens"), ("warmup_tokens", "warmup_steps"),
             ("grad_accum", "global_batch_size"), ("global_batch_size", "grad_accum"))


def _check_known(keys, where: str) -> None:
    unknown = sorted(set(keys) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown training settings {unknown} in {where}; known: {', '.join(sorted(FIELDS))}")


def _coerce(name: str, value):
    """TOML gives ints where floats are meant (lr = 1) and single strings where a list is meant (data = "x")."""
    kind = FIELDS[name].type
    if name == "data" and isinstance(value, str):
        return [value]
    if "float" in str(kind) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def read_toml(path: str | Path) -> dict[str, Any]:
    """Settings of a TOML file: sections flattened (a key must sit in its own section or at the top)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"config file {path} is not valid TOML: {error}") from None
    settings = {}
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):  # a table is a section (no setting of that name is a table)
            _check_known(value, f"{path} [{key}]")
            misplaced = [k for k in value if FIELDS[k].metadata["section"] != key]
            if misplaced:
                raise ValueError(
                    f"{path} [{key}]: {', '.join(misplaced)} belong in "
                    + ", ".join(f"[{FIELDS[k].metadata['section']}]" for k in misplaced)
                )
            settings.update(value)
        else:
            _check_known([key], str(path))
            settings[key] = value
    return {k: _coerce(k, v) for k, v in settings.items()}


def build_config(recipe: str | None = None, file: str | Path | None = None, overrides: dict | None = None,
                 base: dict | None = None) -> TrainConfig:
    """defaults < base (a resumed run's saved settings) < recipe < file < overrides; the file may name a recipe."""
    file_settings = read_toml(file) if file is not None else {}
    overrides = dict(overrides or {})
    _check_known(overrides, "the overrides")
    recipe = overrides.pop("recipe", None) or recipe or file_settings.pop("recipe", None)
    file_settings.pop("recipe", None)
    if recipe is None and base is None:
        recipe = DEFAULT_RECIPE
    if recipe is not None and recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
    settings = dict(base or {})
    layers = [dict(RECIPES[recipe], recipe=recipe)] if recipe is not None else []
    for layer in [*layers, file_settings, {k: _coerce(k, v) for k, v in overrides.items()}]:
        for one, other in EITHER_OR:
            if one in layer and other not in layer:
                settings[other] = None  # a later layer chose the other way of saying it
        settings.update(layer)
    _check_known(settings, "the settings")
    return TrainConfig(**settings).validate()
