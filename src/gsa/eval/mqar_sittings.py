"""MQAR runs longer than one sitting: a run's state saved when its sitting ends, and continued by the next.

The paper's accuracies come from ~50,000-step runs; at d=512 that is close to an hour of an H200, longer than one
command may run on a lent GPU. With `--sitting-seconds S` every run trains its fixed step schedule for at most S
seconds, then saves its state (the same atomic, verified checkpoint folders as `gsa train`: model and AdamW state
in safetensors, the batch stream's generator state, step and validation history in JSON) under
`<checkpoint_dir>/<run>/`; the same command again continues each run from there, and a finished run's result is
kept as `result.json` beside, so rerunning a finished sweep only rebuilds its table. Continued runs train exactly
as the uninterrupted run does (bitwise on the CPU: the checkpoint holds everything a step reads).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from ..train.checkpoint import (
    list_checkpoints, load_checkpoint, prune_checkpoints, remove_interrupted_saves, save_checkpoint,
)
from ..train.distributed import Processes, gather_state, scatter_state

RESULT_FILE = "result.json"
_ONE_PROCESS = Processes(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))  # (whole state dicts)
# settings that may change between sittings: how long a sitting is and where the state lives
SITTING_FIELDS = ("sitting_seconds", "checkpoint_dir")


def run_name(run) -> str:
    return f"{run.model}-d{run.width}-lr{run.lr:g}-seed{run.seed}"


def _plain(value):
    """JSON's view of a value (tuples become lists), so identities read back compare equal."""
    return json.loads(json.dumps(value))


class RunSittings:
    """One run's folder of sittings: its latest state, or its finished result."""

    def __init__(self, checkpoint_dir: str | os.PathLike, run, task, settings, options, device: torch.device):
        self.folder = Path(checkpoint_dir) / run_name(run)
        kept = {k: v for k, v in asdict(settings).items() if k not in SITTING_FIELDS}
        # the device's kind too: a CPU generator's state does not continue a CUDA one (any GPU continues a GPU run)
        # the options' values (not which of them were given on the command line: `overridden` only names the run)
        built = {k: v for k, v in asdict(options).items() if k != "overridden"}
        self.identity = _plain({"run": asdict(run), "task": asdict(task), "settings": kept, "options": built,
                                "device": device.type})

    def _check(self, identity: dict, where: Path) -> None:
        if identity != self.identity:
            changed = sorted(k for k in self.identity if identity.get(k) != self.identity[k])
            raise ValueError(
                f"{where} holds a run of other settings ({', '.join(changed)} differ); continuing it would mix two "
                f"runs. Remove {self.folder} to start this run afresh, or give the settings it was started with."
            )

    def finished_result(self) -> dict | None:
        path = self.folder / RESULT_FILE
        if not path.is_file():
            return None
        saved = json.loads(path.read_text(encoding="utf-8"))
        self._check(saved["identity"], path)
        return saved["result"]

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, stream: torch.Generator) -> dict | None:
        """Put the latest sitting's state into model, optimizer and stream (in place); returns its trainer state
        (step, history, training seconds, sittings so far), or None when the run has not started."""
        remove_interrupted_saves(self.folder)  # a save killed midway left a staging folder, never a checkpoint
        saved = list_checkpoints(self.folder)
        if not saved:
            return None
        checkpoint = load_checkpoint(saved[-1])
        self._check(checkpoint.trainer_state["identity"], saved[-1])
        # name-keyed state dicts, as `gsa train` loads them (the optimizer's groups, and a graph's learning-rate
        # tensor with them, are replaced: graphs are captured only after this)
        scatter_state(model, optimizer, checkpoint.model_state, checkpoint.optimizer_state, _ONE_PROCESS)
        stream.set_state(checkpoint.rng_states[0][1]["stream"])
        return checkpoint.trainer_state

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, stream: torch.Generator, step: int,
             trainer_state: dict) -> None:
        model_state, optimizer_state = gather_state(model, optimizer, _ONE_PROCESS)
        # a CUDA-graph run's learning rate is a device tensor; the groups go to JSON
        optimizer_state["param_groups"] = [{k: float(v) if isinstance(v, torch.Tensor) else v for k, v in group.items()}
                                           for group in optimizer_state["param_groups"]]
        save_checkpoint(self.folder, step, model.config, model_state, optimizer_state,
                        {**trainer_state, "identity": self.identity}, [({}, {"stream": stream.get_state()})])
        prune_checkpoints(self.folder, keep_last=1)

    def finish(self, result: dict) -> None:
        """Keep the result (written whole, then renamed into place) and drop the state: the run is done."""
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = self.folder / f".{RESULT_FILE}.tmp"
        staging.write_text(json.dumps({"identity": self.identity, "result": result}) + "\n", encoding="utf-8")
        os.replace(staging, self.folder / RESULT_FILE)
        for path in list_checkpoints(self.folder):
            shutil.rmtree(path, ignore_errors=True)

