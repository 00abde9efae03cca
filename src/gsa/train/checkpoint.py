"""Checkpoints that are never half-written and load on any number of processes.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/`:

    model/config.json, model/model.safetensors   the full model (GSAForCausalLM.from_pretrained reads this folder)
    optimizer.safetensors                        AdamW moments and step counts, keyed "<parameter name>/<field>"
    rng.safetensors                              each process's torch (and CUDA) generator state
    trainer_state.json                           step, samples seen, scheduler, optimizer groups, Python and NumPy
                                                 generator states, the run's settings
    manifest.json                                size and SHA-256 of every file above; written last

Nothing is unpickled on load: tensors come from safetensors, the rest from JSON. The folder is written under a
temporary name, every file is fsynced, and only then is it renamed into place, so a crash (even SIGKILL) during a
save leaves the previous checkpoints as they were and at worst a `.tmp-*` folder that is ignored and cleaned up.
Loading checks the manifest first; a damaged file is an error that names it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CHECKPOINT_FORMAT = 1
NAME_PATTERN = re.compile(r"^step-(\d+)$")
STAGING_PREFIX = ".tmp-"
MODEL_DIR = "model"
# optimizer param_group fields that are tuples in torch but lists in JSON
TUPLE_GROUP_FIELDS = ("betas",)


class CheckpointError(ValueError):
    """A checkpoint folder that is incomplete or damaged."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_step(path: Path) -> int | None:
    match = NAME_PATTERN.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders in step order (staging folders of interrupted saves are not checkpoints)."""
    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def remove_interrupted_saves(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Delete the staging folders that saves killed midway left behind; returns them."""
    folder = Path(checkpoints_dir)
    stale = [p for p in folder.iterdir() if p.name.startswith(STAGING_PREFIX)] if folder.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(16 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=1) + "\n")


def _optimizer_tensors(optimizer_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a name-keyed optimizer state dict into tensors (for safetensors) and the rest (for JSON)."""
    tensors, scalars = {}, {}
    for name, fields in optimizer_state["state"].items():
        for key, value in fields.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    return tensors, {"param_groups": optimizer_state["param_groups"], "scalar_state": scalars}


def python_numpy_rng_state() -> dict:
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)]}


def torch_rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(host_state: dict, torch_state: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = host_state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = host_state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch_state["torch"])
    if "cuda" in torch_state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch_state["cuda"])


def save_checkpoint(checkpoints_dir: str | os.PathLike, step: int, model_config, model_state: dict,
                    optimizer_state: dict, trainer_state: dict, rng_states: list[tuple[dict, dict]]) -> Path:
    """Write a checkpoint atomically and return its folder. model_state / optimizer_state: full (gathered) state
    dicts keyed by parameter name; rng_states: (host_state, torch_state) of every process, by rank."""
    checkpoints_dir = Path(checkpoints_dir)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / checkpoint_name(step)
    staging = checkpoints_dir / f"{STAGING_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    (staging / MODEL_DIR).mkdir(parents=True)
    try:
        model_config.to_json_file(staging / MODEL_DIR / "config.json")
        weights = {name: t.detach().cpu().contiguous() for name, t in model_state.items()}
        save_file(weights, staging / MODEL_DIR / "model.safetensors", metadata={"format": "pt"})
        tensors, optimizer_rest = _optimizer_tensors(optimizer_state)
        save_file(tensors, staging / "optimizer.safetensors")
        rng_tensors = {f"rank{rank}/{key}": t.cpu() for rank, (_, ts) in enumerate(rng_states) for key, t in ts.items()}
        save_file(rng_tensors, staging / "rng.safetensors")
        state = dict(trainer_state, format=CHECKPOINT_FORMAT, step=step, optimizer=optimizer_rest,
                     host_rng=[host for host, _ in rng_states])
        _write_json(staging / "trainer_state.json", state)
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        manifest = {"format": CHECKPOINT_FORMAT, "step": step,
                    "files": {str(p.relative_to(staging)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                              for p in files}}
        _write_json(staging / "manifest.json", manifest)
        for path in [*files, staging / "manifest.json", staging / MODEL_DIR, staging]:
            _fsync(path)
        if final.exists():  # a run resumed from an earlier checkpoint reaches this step again: replace it
            retired = checkpoints_dir / f"{STAGING_PREFIX}{final.name}-replaced-{uuid.uuid4().hex[:8]}"
            os.rename(final, retired)
            os.rename(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, final)
        _fsync(checkpoints_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def prune_checkpoints(checkpoints_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest keep_last checkpoints; returns the deleted ones."""
    old = list_checkpoints(checkpoints_dir)[:-keep_last] if keep_last >= 1 else []
    for path in old:
        shutil.rmtree(path)
    return old


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """The manifest of a complete, undamaged checkpoint; CheckpointError naming the first problem otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no manifest.json (a save did not finish)")
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {path} is damaged: manifest.json is unreadable ({error})") from None
    if manifest.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {manifest.get('format')}, expected {CHECKPOINT_FORMAT}")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is damaged: {name} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint {path} is damaged: {name} has {size} bytes, the manifest recorded {expected['bytes']}"
            )
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} does not match its SHA-256 in the manifest")
    return manifest


@dataclass
class LoadedCheckpoint:
    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict
    trainer_state: dict
    rng_states: list[tuple[dict, dict]]

    @property
    def step(self) -> int:
        return int(self.trainer_state["step"])


def load_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """Read a checkpoint after verifying it; CheckpointError if it is incomplete or damaged."""
    path = Path(path)
    verify_checkpoint(path)
    try:
        trainer_state = json.loads((path / "trainer_state.json").read_text())
        model_state = load_file(path / MODEL_DIR / "model.safetensors")
        tensors = load_file(path / "optimizer.safetensors")
        rng_tensors = load_file(path / "rng.safetensors")
    except (json.JSONDecodeError, SafetensorError, OSError) as error:
        raise CheckpointError(f"checkpoint {path} is damaged: {error}") from None
    rest = trainer_state.pop("optimizer")
    state: dict[str, dict] = {}
    for key, tensor in tensors.items():
        name, field = key.rsplit("/", 1)
        state.setdefault(name, {})[field] = tensor
    for name, fields in rest["scalar_state"].items():
        state.setdefault(name, {}).update(fields)
    groups = [{k: tuple(v) if k in TUPLE_GROUP_FIELDS else v for k, v in g.items()} for g in rest["param_groups"]]
    host_states = trainer_state.pop("host_rng")
    rng_states = []
    for rank, host in enumerate(host_states):
        prefix = f"rank{rank}/"
        rng_states.append((host, {k[len(prefix):]: t for k, t in rng_tensors.items() if k.startswith(prefix)}))
    return LoadedCheckpoint(path, model_state, {"state": state, "param_groups": groups}, trainer_state, rng_states)
