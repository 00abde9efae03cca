"""The training loop: one function, `train(config)`, the same on one CPU, one GPU or N GPUs under torchrun.

Each optimizer step reads the global batch's windows by sample index (a pure function of the samples seen so far,
see gsa.data.SampleOrder), splits them over processes and micro-batches, and weights each micro-batch's mean loss
by its share of the step's targets, so the update is the mean over every target of the global batch however it is
split: one process with batch 8 takes the same steps as two with batch 4 each, or one with 4 and two micro-batches.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from ..data import Corpus, PackedWindows, SampleOrder, load_tokenizer, make_batch, split_spans, tokenize_corpus
from ..layers import GatedSlotAttention, SwiGLU
from ..models import GSAConfig, GSAForCausalLM, preset_config
from . import distributed as dist_utils
from .checkpoint import (
    MODEL_DIR,
    CheckpointError,
    checkpoint_name,
    checkpoint_step,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    python_numpy_rng_state,
    remove_interrupted_saves,
    restore_rng,
    save_checkpoint,
    torch_rng_state,
    verify_checkpoint,
)
from .config import TrainConfig
from .metrics import MetricsLog, plot_losses
from .optim import build_optimizer, build_scheduler

RUNS_DIR = Path("runs")


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    step: int
    tokens_seen: int
    val_loss: float | None
    val_perplexity: float | None
    sample: str | None
    loss_plot: Path | None
    metrics_file: Path
    train_seconds: float


def find_checkpoint(resume: str, run_dir: str | os.PathLike | None) -> Path:
    """The checkpoint folder `resume` names: "latest" (the newest in run_dir), a run folder (its newest), or a
    checkpoint folder."""
    if resume == "latest":
        if run_dir is None:
            raise ValueError("--resume latest needs --run-dir or --name to say which run; or pass --resume RUN_FOLDER")
        folder = Path(run_dir)
    else:
        folder = Path(resume)
        if checkpoint_step(folder) is not None or (folder / "manifest.json").is_file():
            return folder
    found = list_checkpoints(folder / "checkpoints")
    if not found:
        raise ValueError(f"nothing to resume: {folder / 'checkpoints'} holds no checkpoint")
    return found[-1]


def run_dir_of(checkpoint: Path) -> Path:
    """A checkpoint lives in RUN/checkpoints/step-N."""
    return checkpoint.parent.parent


def read_saved_settings(checkpoint: Path) -> dict:
    """The settings a checkpoint's run used (to resume without repeating its flags)."""
    state_file = checkpoint / "trainer_state.json"
    if not state_file.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} is incomplete: it has no trainer_state.json")
    try:
        return json.loads(state_file.read_text())["config"]
    except (json.JSONDecodeError, KeyError) as error:
        raise CheckpointError(
            f"checkpoint {checkpoint} is damaged: trainer_state.json is unreadable ({error})"
        ) from None


def _explain_damaged(error: CheckpointError, checkpoint: Path) -> CheckpointError:
    """The error, plus which earlier checkpoint of the run is intact and how to resume from it."""
    for earlier in reversed(list_checkpoints(checkpoint.parent)):
        if checkpoint_step(earlier) >= checkpoint_step(checkpoint):
            continue
        try:
            verify_checkpoint(earlier)
        except CheckpointError:
            continue
        return CheckpointError(f"{error}. The earlier checkpoint {earlier} is intact: resume from it with "
                               f"--resume {earlier}, or delete the damaged one")
    return CheckpointError(f"{error}. No earlier intact checkpoint of this run was found")


def _memory_gib(device: torch.device) -> float:
    """Peak memory so far: CUDA memory allocated by tensors on GPU, the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def _link_or_copy(source: str, target: str) -> None:
    """Hard-link a checkpoint's weights into the model folder (no second copy of a 5 GB file); copy across disks."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def choose_cpu_threads(requested: int) -> tuple[int, str]:
    """(threads, why). Threads that wait on a core another process holds stall every parallel operator (a busy
    2-core machine ran the tiny model 10x slower on 2 threads than on 1), so automatic mode takes only the cores the
    1-minute load average leaves idle."""
    if requested > 0:
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    threads = max(1, min(torch.get_num_threads(), int(cores - load + 0.5)))
    return threads, f"{cores} cores, load average {load:.1f}"


def choose_parallel(config: TrainConfig) -> str:
    """What manages the model: --parallel, with `auto` resolved. FSDP2 across processes; on one GPU computing in
    bf16 also FSDP2 (a group of one), whose mixed precision computes with bf16 copies of float32 master weights
    where autocast would cast every weight at every micro-step and keep the residual stream in float32: the 1.3B
    recipe ran 57.3K tok/s and 39.6 GiB that way on an H200 against autocast's 52.1K and 42.6 GiB. Nothing for one
    CPU process, or float32 on one GPU; DDP of one process replicates nothing, so none either."""
    several = dist_utils.launched_world_size() > 1
    if config.parallel == "ddp" and not several:
        return "none"
    if config.parallel != "auto":
        return config.parallel
    if several:
        return "fsdp"
    on_gpu = dist_utils.resolve_device(config.device, 0).type == "cuda"
    return "fsdp" if on_gpu and config.precision in ("auto", "bf16") else "none"


@dataclass
class _LogWindow:
    """The steps since the last log record: their summed loss (a device tensor, read only when logging), targets,
    tokens and seconds."""

    loss: torch.Tensor
    targets: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, summed_loss: torch.Tensor, targets: int, tokens: int) -> None:
        self.loss += summed_loss
        self.targets += targets
        self.tokens += tokens

    def reset(self) -> None:
        self.loss.zero_()
        self.targets, self.tokens, self.seconds = 0, 0, 0.0


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped the run at a step's end, after checkpointing that step."""


@contextlib.contextmanager
def _interrupts_held_to_step_end(enabled: bool):
    """Hold Ctrl-C (SIGINT) until the step in flight ends, so the run can checkpoint a whole step (never a half-made
    optimizer update) before it stops; a second Ctrl-C (a second after the first or later) stops at once. Yields a
    function: has one arrived? Off with several processes, which would have to agree on the step to save at, and
    where SIGINT is not Python's default (ignored in a background job, or handled by the caller)."""
    if (not enabled or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield lambda: False
        return
    received = []

    def hold(signum, frame):
        if received:
            if time.monotonic() - received[0] < 1.0:
                return  # the same interrupt again: `timeout` signals the child, then its process group
            raise KeyboardInterrupt
        received.append(time.monotonic())
        print("\ninterrupt: stopping after this step, with a checkpoint (Ctrl-C again to stop now)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield lambda: bool(received)
    finally:
        signal.signal(signal.SIGINT, previous)


class Trainer:
    """State of one run; `train(config)` builds it and calls `run()`."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.parallel = choose_parallel(config)
        self.processes = dist_utils.start_processes(config.device, group_of_one=self.parallel == "fsdp")
        self.device = self.processes.device
        self.main = self.processes.is_main
        self.bar = None
        self.threads_note = ""
        if self.device.type == "cpu":
            threads, why = choose_cpu_threads(config.threads)
            torch.set_num_threads(threads)
            self.threads_note = f" ({threads} thread{'s' if threads > 1 else ''}: {why})"

    # -- reporting ------------------------------------------------------------------------------------------------
    def say(self, message: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    # -- set-up ---------------------------------------------------------------------------------------------------
    def _resolve_run(self) -> None:
        config = self.config
        self.checkpoint_path = None
        if config.resume is not None:
            self.checkpoint_path = find_checkpoint(config.resume, config.run_dir or (
                RUNS_DIR / config.name if config.name else None))
            run_dir = Path(config.run_dir) if config.run_dir else run_dir_of(self.checkpoint_path)
        elif config.run_dir is not None:
            run_dir = Path(config.run_dir)
        else:
            name = config.name or f"{config.recipe or 'run'}-{datetime.now():%Y%m%d-%H%M%S}"
            run_dir = RUNS_DIR / dist_utils.all_gather_objects(name, self.processes)[0]  # one name for all ranks
        if self.checkpoint_path is None and list_checkpoints(run_dir / "checkpoints"):
            raise ValueError(f"{run_dir} already holds a run's checkpoints; continue it with --resume {run_dir}, "
                             "or choose another --name / --run-dir")
        self.run_dir = run_dir
        self.checkpoints_dir = run_dir / "checkpoints"
        if self.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            stale = remove_interrupted_saves(self.checkpoints_dir)
            if stale:
                self.say(f"removed {len(stale)} unfinished checkpoint save(s) of an interrupted run")

    def _resolve_tokenizer(self):
        spec = self.config.tokenizer
        if spec == "auto":
            spec = "bytes"
            if self.config.init_from is not None:
                folder = Path(self.config.init_from)
                if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model",
                                                               "tokenizer_config.json")):
                    spec = str(folder)
        self.config = replace(self.config, tokenizer=spec)
        self.tokenizer = load_tokenizer(spec)

    def _prepare_data(self) -> None:
        config = self.config
        corpus = Corpus(tuple(config.data), config.text_field)
        # one process per machine tokenises (others would race to build the same cache); the rest then map it
        if self.processes.local_rank == 0:
            tokenized = tokenize_corpus(corpus, self.tokenizer, config.cache_dir,
                                        progress=config.progress and self.main)
        dist_utils.barrier(self.processes)
        if self.processes.local_rank != 0:
            tokenized = tokenize_corpus(corpus, self.tokenizer, config.cache_dir)
        self.tokenized = tokenized
        train_spans, val_spans = split_spans(tokenized, config.val_fraction)
        self.train_windows = PackedWindows(tokenized.tokens, train_spans, config.seq_len)
        self.val_windows = PackedWindows(tokenized.tokens, val_spans, config.seq_len)
        if len(self.train_windows) == 0:
            raise ValueError(f"the training split has {self.train_windows.num_tokens} tokens, not enough for one "
                             f"sequence of seq_len {config.seq_len} + 1; use a shorter --seq-len or more data")
        if config.val_fraction > 0 and len(self.val_windows) == 0:
            raise ValueError(f"the validation split has {self.val_windows.num_tokens} tokens, not enough for one "
                             f"sequence of seq_len {config.seq_len} + 1; raise --val-fraction, lower --seq-len, or "
                             "pass --val-fraction 0 to train without validation")
        self.order = SampleOrder(len(self.train_windows), config.seed)

    def _build_model(self) -> None:
        config = self.config
        torch.manual_seed(config.seed)
        if self.checkpoint_path is not None:
            model_config = GSAConfig.from_pretrained(self.checkpoint_path / MODEL_DIR)
            with torch.device(self.device):
                model = GSAForCausalLM(model_config)
        elif config.init_from is not None:
            if config.model_overrides:
                raise ValueError("model_overrides cannot change a model loaded with --init-from")
            model = GSAForCausalLM.from_pretrained(config.init_from, dtype=torch.float32).to(self.device)
        else:
            ids = dict(vocab_size=self.tokenizer.vocab_size, bos_token_id=self.tokenizer.bos_id,
                       eos_token_id=self.tokenizer.eos_id, pad_token_id=self.tokenizer.pad_id)
            model_config = preset_config(config.model, **{**ids, **config.model_overrides})
            with torch.device(self.device):
                model = GSAForCausalLM(model_config)
        if self.tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocabulary is "
                             f"{model.config.vocab_size}; pick the model's tokenizer with --tokenizer")
        model.train()
        # training-time choices, not the saved model's (its config.json keeps its own settings)
        for module in model.modules():
            if config.keep_features and isinstance(module, (GatedSlotAttention, SwiGLU)):
                module.recompute_features = False
            if config.keep_states and isinstance(module, GatedSlotAttention):
                module.recompute_states = False
            if config.keep_norms and isinstance(module, (GatedSlotAttention, SwiGLU)):
                module.recompute_norms = False
        if config.activation_checkpointing:
            options = {"use_reentrant": False}  # the non-reentrant form works under FSDP and with frozen inputs
            if hasattr(model, "activation_checkpointing_enable"):  # newer transformers; the old name warns there
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        if config.compile:
            for block in model.model.layers:
                block.compile()
        self.num_parameters = sum(p.numel() for p in model.parameters())

        precision = config.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        parallel = self.parallel
        compute_dtype = torch.bfloat16 if precision == "bf16" else None
        if parallel == "fsdp":
            model = dist_utils.apply_fsdp(model, compute_dtype, self.device)
            self.autocast = contextlib.nullcontext  # FSDP's mixed-precision policy casts the parameters itself
        else:
            if parallel == "ddp":
                model = dist_utils.apply_ddp(model, self.device)
            if compute_dtype is None:
                self.autocast = contextlib.nullcontext
            else:
                self.autocast = lambda: torch.autocast(self.device.type, dtype=compute_dtype)
        self.model = model
        self.optimizer = build_optimizer(model, config.lr, config.weight_decay, (config.beta1, config.beta2),
                                         config.eps, self.device)
        self.accum, self.global_batch = config.batch_layout(self.processes.world_size)
        self.tokens_per_step = self.global_batch * config.seq_len
        self.warmup_steps = config.warmup(self.tokens_per_step)
        self.scheduler = build_scheduler(self.optimizer, config.lr, config.min_lr, self.warmup_steps, config.steps)

    def _restore(self) -> None:
        """Load the checkpoint (rank 0 reads and verifies the files; the state reaches the others through the
        collective state-dict calls)."""
        self.step, self.samples_seen, self.tokens_seen = 0, 0, 0
        self.train_seconds = 0.0  # time in training steps, over every sitting of the run
        self.last_checkpoint = self.checkpoint_path
        if self.checkpoint_path is None:
            return
        loaded, error = None, None
        if self.main:
            try:
                loaded = load_checkpoint(self.checkpoint_path)
            except CheckpointError as caught:
                error = str(_explain_damaged(caught, self.checkpoint_path))
        first = dist_utils.all_gather_objects(
            (error, None if loaded is None else (loaded.trainer_state, loaded.rng_states)), self.processes)[0]
        if first[0] is not None:
            raise CheckpointError(first[0])
        trainer_state, rng_states = first[1]
        dist_utils.scatter_state(self.model, self.optimizer, loaded.model_state if loaded else {},
                                 loaded.optimizer_state if loaded else {}, self.processes)
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        restore_rng(*rng_states[min(self.processes.rank, len(rng_states) - 1)])
        self.step = trainer_state["step"]
        self.samples_seen = trainer_state["samples_seen"]
        self.tokens_seen = trainer_state["tokens_seen"]
        self.train_seconds = trainer_state.get("train_seconds", 0.0)  # absent from checkpoints before session 9
        if trainer_state.get("data_fingerprint") != self.tokenized.fingerprint:
            self.say("warning: the training text or tokenizer differs from the checkpoint's; the data order will not "
                     "continue the interrupted run's")
        if trainer_state.get("global_batch_size") != self.global_batch:
            self.say(f"note: global batch {self.global_batch} sequences, the checkpoint's run used "
                     f"{trainer_state.get('global_batch_size')}; data continues at sample {self.samples_seen}")
        self.say(f"resumed from {self.checkpoint_path} (step {self.step})")

    # -- the loop -------------------------------------------------------------------------------------------------
    def _micro_batches(self) -> tuple[list, int]:
        """This process's micro-batches of the step, and the number of targets in the whole global batch (every
        process counts it from the sample order: no communication)."""
        size, world, rank = self.config.batch_size, self.processes.world_size, self.processes.rank
        batches = []
        for micro in range(self.accum):
            first = self.samples_seen + (micro * world + rank) * size
            indices = self.order.indices(first, size)
            batches.append(make_batch(self.train_windows, indices, self.config.pack_documents).to(self.device))
        total_targets = self.train_windows.num_targets(self.order.indices(self.samples_seen, self.global_batch))
        return batches, max(total_targets, 1)

    def _train_step(self) -> tuple[torch.Tensor, int, torch.Tensor, float]:
        """One optimizer step; returns (summed target losses of this process, targets over all processes, the
        gradient norm, the learning rate used)."""
        batches, total_targets = self._micro_batches()
        world = self.processes.world_size
        summed_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro, batch in enumerate(batches):
            with dist_utils.gradient_sync(self.model, micro == len(batches) - 1), self.autocast():
                loss = self.model(**batch.model_inputs()).loss
            # processes' gradients are averaged, hence the world factor: the result is d(mean target loss)
            (loss * (batch.num_targets * world / total_targets)).backward()
            summed_loss += loss.detach().double() * batch.num_targets
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip or math.inf)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return summed_loss, total_targets, grad_norm, lr

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(mean loss per target, perplexity) over eval_windows windows spread evenly over the validation split."""
        count = min(len(self.val_windows), self.config.eval_windows)
        chosen = np.unique(np.linspace(0, len(self.val_windows) - 1, count).round().astype(np.int64))
        world, rank, size = self.processes.world_size, self.processes.rank, self.config.batch_size
        mine = chosen[rank::world].tolist()
        # every process runs the same number of forward passes (FSDP gathers parameters collectively)
        rounds = math.ceil(math.ceil(len(chosen) / world) / size)
        self.model.eval()
        nll = torch.zeros((), dtype=torch.float64, device=self.device)
        targets = 0
        for r in range(rounds):
            indices = mine[r * size : (r + 1) * size]
            batch = make_batch(self.val_windows, indices or [0], self.config.pack_documents, predict=bool(indices))
            batch = batch.to(self.device)
            with self.autocast():
                loss = self.model(**batch.model_inputs(), use_cache=False).loss
            nll += loss.double() * batch.num_targets
            targets += batch.num_targets
        self.model.train()
        total_nll, total_targets = dist_utils.all_reduce_sum([nll.item(), targets], self.processes)
        mean = total_nll / max(total_targets, 1)
        return mean, math.exp(min(mean, 700.0))

    def save(self) -> None:
        """Write a checkpoint of this step (every process takes part; rank 0 writes)."""
        model_state, optimizer_state = dist_utils.gather_state(self.model, self.optimizer, self.processes)
        rng_states = dist_utils.all_gather_objects((python_numpy_rng_state(), torch_rng_state()), self.processes)
        if self.main:
            trainer_state = {
                "step": self.step, "samples_seen": self.samples_seen, "tokens_seen": self.tokens_seen,
                "global_batch_size": self.global_batch, "world_size": self.processes.world_size,
                "train_seconds": self.train_seconds,
                "scheduler": self.scheduler.state_dict(), "data_fingerprint": self.tokenized.fingerprint,
                "config": self.config.to_dict(),
            }
            save_checkpoint(self.checkpoints_dir, self.step, dist_utils.unwrap(self.model).config, model_state,
                            optimizer_state, trainer_state, rng_states)
            prune_checkpoints(self.checkpoints_dir, self.config.keep_last)
        dist_utils.barrier(self.processes)
        self.last_checkpoint = self.checkpoints_dir / checkpoint_name(self.step)

    def _export_model(self, checkpoint: Path) -> Path:
        """run_dir/model: the last checkpoint's weights and config, with the tokenizer beside them."""
        target = self.run_dir / "model"
        if self.main:
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(checkpoint / MODEL_DIR, target, copy_function=_link_or_copy)
            self.tokenizer.save(target)
        dist_utils.barrier(self.processes)
        return target

    def _sample(self, model_dir: Path) -> str | None:
        config = self.config
        if not self.main or config.sample_tokens == 0:
            return None
        if self.processes.distributed or dist_utils.is_sharded(self.model):
            # a whole copy on rank 0: the trained model is split over the processes, or FSDP2's DTensors on one
            model = GSAForCausalLM.from_pretrained(model_dir).to(self.device)
        else:
            model = dist_utils.unwrap(self.model)
        model.eval()
        prompt = ([self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []) + \
            self.tokenizer.encode(config.sample_prompt)
        input_ids = torch.tensor([prompt], device=self.device)
        generator_state = torch.get_rng_state()
        torch.manual_seed(config.seed)
        with torch.no_grad(), self.autocast():
            output = model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=config.sample_tokens,
                do_sample=config.sample_temperature > 0, temperature=config.sample_temperature or None, top_k=None,
                top_p=None, eos_token_id=self.tokenizer.eos_id,
                pad_token_id=self.tokenizer.eos_id if self.tokenizer.pad_id is None else self.tokenizer.pad_id,
            )
        torch.set_rng_state(generator_state)
        model.train()
        return config.sample_prompt + self.tokenizer.decode(output[0, len(prompt):].tolist())

    def _announce(self) -> None:
        """One paragraph of what is about to run: model, data, processes, precision, batch and schedule."""
        config = self.config
        world = self.processes.world_size
        self.say(
            f"model {config.init_from or config.model}: {self.num_parameters / 1e6:.1f}M parameters | "
            f"tokenizer {self.tokenizer.name} ({self.tokenizer.vocab_size}) | data {', '.join(config.data)}: "
            f"{self.train_windows.num_tokens:,} training tokens, {self.val_windows.num_tokens:,} validation\n"
            f"{world} process(es) on {self.device.type}{self.threads_note}, "
            f"{self.parallel if world > 1 else 'single process' + (', fsdp' if self.parallel == 'fsdp' else '')}, "
            f"{self.precision} | batch {self.global_batch} x {config.seq_len} = {self.tokens_per_step:,} tokens a step "
            f"({config.batch_size} per process x {self.accum} accumulation) | steps {config.steps:,}, warm-up "
            f"{self.warmup_steps} | run folder {self.run_dir}"
        )

    def _run_steps(self, metrics: MetricsLog | None) -> tuple[float | None, float | None]:
        """Train from self.step to the last step: log every log_every steps, evaluate every eval_every (returns the
        last validation loss and perplexity), save every save_every. A Ctrl-C held during a step logs, saves and
        raises TrainingInterrupted after it (one held during the logging, evaluation or save stops after the next
        step; at the last step the run just ends)."""
        config = self.config
        val_loss = val_ppl = None
        window = _LogWindow(torch.zeros((), dtype=torch.float64, device=self.device))
        with _interrupts_held_to_step_end(not self.processes.distributed) as held:
            while self.step < config.steps:
                started = time.perf_counter()
                summed_loss, targets, grad_norm, lr = self._train_step()
                self.step += 1
                self.samples_seen += self.global_batch
                self.tokens_seen += self.tokens_per_step
                window.add(summed_loss, targets, self.tokens_per_step)
                stopping = held() and self.step < config.steps
                if self.step % config.log_every == 0 or self.step == config.steps or stopping:
                    self._log_window(window, started, grad_norm, lr, metrics)
                else:
                    window.seconds += time.perf_counter() - started
                if self.bar is not None:
                    self.bar.update(1)
                if len(self.val_windows) and (self.step % config.eval_every == 0 or self.step == config.steps):
                    val_loss, val_ppl = self.evaluate()
                    if self.main:
                        metrics.write({"step": self.step, "tokens": self.tokens_seen, "val_loss": val_loss,
                                       "val_perplexity": val_ppl})
                    self.say(f"step {self.step}: validation loss {val_loss:.4f}, perplexity {val_ppl:.3f}")
                if self.step % config.save_every == 0 or self.step == config.steps or stopping:
                    self.save()
                if stopping:
                    raise TrainingInterrupted(f"interrupted at step {self.step}, saved in {self.last_checkpoint}; "
                                              f"`gsa train --resume {self.run_dir}` continues the run")
        return val_loss, val_ppl

    def _log_window(self, window: _LogWindow, started: float, grad_norm, lr: float, metrics: MetricsLog | None):
        """Write the log record of the steps since the last one (mean loss over their targets, tokens/s: reading
        the loss waits for the device, so the window's seconds hold its steps' device time) and start a new
        window."""
        (loss_sum,) = dist_utils.all_reduce_sum([window.loss.item()], self.processes)
        window.seconds += time.perf_counter() - started
        loss = loss_sum / window.targets
        if not math.isfinite(loss):
            raise FloatingPointError(f"training diverged at step {self.step}: the loss is {loss}; "
                                     f"lower --lr (now {self.config.lr}) or raise --warmup-steps")
        norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        tokens_per_s = window.tokens / window.seconds
        record = {"step": self.step, "tokens": self.tokens_seen, "loss": loss, "lr": lr, "grad_norm": float(norm),
                  "tokens_per_s": tokens_per_s,
                  "tokens_per_s_per_process": tokens_per_s / self.processes.world_size,
                  "memory_gib": _memory_gib(self.device), "train_seconds": self.train_seconds + window.seconds}
        if self.main:
            metrics.write(record)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self.train_seconds += window.seconds
        window.reset()

    def run(self) -> TrainResult:
        self._resolve_run()
        self._resolve_tokenizer()
        self._prepare_data()
        self._build_model()
        self._restore()
        config = self.config
        metrics = MetricsLog(self.run_dir, self.step if self.checkpoint_path else None) if self.main else None
        if self.main:
            (self.run_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
        self._announce()
        if self.main and config.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=config.steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True,
                            file=sys.stdout)
        try:
            val_loss, val_ppl = self._run_steps(metrics)
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            if val_loss is None and len(self.val_windows):
                val_loss, val_ppl = self.evaluate()  # a run resumed after its last step
            if self.last_checkpoint is None or checkpoint_step(self.last_checkpoint) != self.step:
                self.save()
            model_dir = self._export_model(self.last_checkpoint)
            sample = self._sample(model_dir)
        finally:
            if self.bar is not None:
                self.bar.close()
            if metrics is not None:
                metrics.close()
        plot = plot_losses(metrics.path, self.run_dir / "loss.png", title=self.run_dir.name) if self.main else None
        return TrainResult(self.run_dir, model_dir, self.step, self.tokens_seen, val_loss, val_ppl, sample, plot,
                           self.run_dir / "metrics.jsonl", self.train_seconds)


def train(config: TrainConfig) -> TrainResult:
    """Train as `config` says (joining torchrun's process group when launched by torchrun)."""
    trainer = Trainer(config.validate())
    try:
        return trainer.run()
    finally:
        dist_utils.stop_processes()
