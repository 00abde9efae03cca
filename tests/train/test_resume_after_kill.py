"""A run killed with SIGKILL and resumed reproduces the uninterrupted run's losses bit for bit (CPU)."""

from __future__ import annotations

import json
import signal
import subprocess
import time

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
def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path):
    settings = tiny_settings(tmp_path, steps=STEPS, save_every=SAVE_EVERY, eval_every=10, keep_last=2)
    config = write_config_file(tmp_path / "run.toml", settings)
    straight = tmp_path / "straight"
    run_command(gsa_train_command("--config", str(config), "--run-dir", str(straight)), cwd=tmp_path)

    killed = tmp_path / "killed"
    process = subprocess.Popen(gsa_train_command("--config", str(config), "--run-dir", str(killed)), cwd=tmp_path,
                               env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while logged_steps(killed / "metrics.jsonl") < KILL_AFTER:
        assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()}"
        assert time.monotonic() < deadline, "the run did not reach the kill point"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    stopped_at = logged_steps(killed / "metrics.jsonl")
    assert KILL_AFTER <= stopped_at < STEPS  # killed midway, after steps the last checkpoint does not hold

    result = run_command(gsa_train_command("--resume", str(killed)), cwd=tmp_path)
    assert "resumed from" in result.stdout
    assert train_losses(killed) == train_losses(straight)  # every step once, each loss bit-identical
    records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in records if "val_loss" in r] == [
        json.loads(line)["val_loss"] for line in (straight / "metrics.jsonl").read_text().splitlines()
        if "val_loss" in line
    ]
    a, b = (load_file(run / "model" / "model.safetensors") for run in (straight, killed))
    assert all(torch.equal(a[name], b[name]) for name in a)
