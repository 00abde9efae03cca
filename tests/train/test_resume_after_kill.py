"""A run killed with SIGKILL, or stopped with Ctrl-C (SIGINT), and resumed reproduces the uninterrupted run's losses
bit for bit (CPU)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.common import (
    gsa_train_command,
    run_command,
    subprocess_env,
    tiny_settings,
    train_losses,
    write_config_file,
)

STEPS, SAVE_EVERY, KILL_AFTER = 40, 5, 13


def logged_steps(metrics) -> int:
    if not metrics.is_file():
        return 0
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.endswith("}")]
    return max((r["step"] for r in lines), default=0)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl-c"])
def test_stopped_then_resumed_matches_the_uninterrupted_run(tmp_path, stop):
    """SIGKILL: the run resumes from its last periodic checkpoint. Ctrl-C: the run finishes the step in flight,
    checkpoints it, says so and exits with 130; it resumes from that step."""
    settings = tiny_settings(tmp_path, steps=STEPS, save_every=SAVE_EVERY, eval_every=10, keep_last=2)
    config = write_config_file(tmp_path / "run.toml", settings)
    straight = tmp_path / "straight"
    run_command(gsa_train_command("--config", str(config), "--run-dir", str(straight)), cwd=tmp_path)

    stopped = tmp_path / "stopped"
    process = subprocess.Popen(gsa_train_command("--config", str(config), "--run-dir", str(stopped)), cwd=tmp_path,
                               env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while logged_steps(stopped / "metrics.jsonl") < KILL_AFTER:
        assert process.poll() is None, f"the run ended before it could be stopped: {process.stderr.read()}"
        assert time.monotonic() < deadline, "the run did not reach the stopping point"
        time.sleep(0.005)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=120)
    stopped_at = logged_steps(stopped / "metrics.jsonl")
    assert KILL_AFTER <= stopped_at < STEPS  # stopped midway, after steps the last periodic checkpoint does not hold
    if stop == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:
        assert process.returncode == 130, stderr
        saved = sorted(path.name for path in (stopped / "checkpoints").glob("step-*"))
        said = re.search(r"interrupted at step (\d+), saved in (\S+);", stderr)
        assert said, stderr
        assert Path(said.group(2)).name == saved[-1] and int(said.group(1)) == int(saved[-1].split("-")[1])
        assert int(said.group(1)) >= stopped_at  # the step in flight was finished, not dropped

    result = run_command(gsa_train_command("--resume", str(stopped)), cwd=tmp_path)
    assert "resumed from" in result.stdout
    assert train_losses(stopped) == train_losses(straight)  # every step once, each loss bit-identical
    records = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in records if "val_loss" in r] == [
        json.loads(line)["val_loss"] for line in (straight / "metrics.jsonl").read_text().splitlines()
        if "val_loss" in line
    ]
    a, b = (load_file(run / "model" / "model.safetensors") for run in (straight, stopped))
    assert all(torch.equal(a[name], b[name]) for name in a)
