"""Shared by the training tests: a small synthetic corpus, settings for a model small enough to train in
milliseconds a step, and a way to run `gsa train` in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from gsa.train import build_config
from gsa.train.cli import config_as_toml

TINY_MODEL = {"hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2, "num_slots": 4, "intermediate_size": 64}
WORDS = ("the king queen lord love death night day sweet sword crown heart blood tears speak hear thou thee art "
         "hath doth shall will not no yes my thy our fair foul good ill").split()


def write_corpus(folder: Path, documents: int = 12, seed: int = 0) -> Path:
    """Plain-text files of random lines over a small vocabulary (a few KB each)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(documents):
        lines = [" ".join(rng.choice(WORDS, rng.integers(3, 9))) for _ in range(rng.integers(20, 80))]
        (folder / f"part{d:02d}.txt").write_text("\n".join(lines) + "\n")
    return folder


def tiny_settings(tmp_path: Path, **overrides) -> dict:
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        write_corpus(corpus)
    settings = dict(
        data=[str(corpus)], tokenizer="bytes", model="gsa-tiny", model_overrides=dict(TINY_MODEL), seq_len=32,
        val_fraction=0.1, batch_size=4, steps=6, warmup_steps=2, lr=1e-2, min_lr=1e-3, eval_every=3, eval_windows=8,
        log_every=1, save_every=3, keep_last=5, sample_tokens=0, progress=False, device="cpu", threads=1,
        cache_dir=str(tmp_path / "cache"),
        run_dir=str(tmp_path / "run"),
    )
    settings.update(overrides)
    return settings


def tiny_config(tmp_path: Path, **overrides):
    return build_config(overrides=tiny_settings(tmp_path, **overrides))


def write_config_file(path: Path, settings: dict) -> Path:
    path.write_text(config_as_toml(build_config(overrides=settings)))
    return path


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def subprocess_env() -> dict:
    """One thread a process: tiny models gain nothing from more, and a busy machine slows threaded runs badly."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def gsa_train_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "gsa", "train", *args]


def torchrun_command(processes: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m", "gsa",
            "train", *args]


def run_command(command: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result
