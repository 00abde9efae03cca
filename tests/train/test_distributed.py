"""torchrun on CPU (gloo): 2-process FSDP2 takes the same steps as one process with the same global batch, and its
checkpoints resume on another number of processes and under DDP."""

from __future__ import annotations

import pytest

from tests.train.common import (
    gsa_train_command,
    run_command,
    tiny_settings,
    torchrun_command,
    train_losses,
    write_config_file,
)

GLOBAL_BATCH = 4


def assert_same_losses(got, want, rel=1e-5):
    assert [s for s, _ in got] == [s for s, _ in want]
    for (step, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=rel), f"step {step}: {a} vs {b}"


@pytest.mark.slow
def test_fsdp_and_ddp_on_two_processes_match_one_process(tmp_path):
    settings = tiny_settings(tmp_path, steps=8, save_every=3, global_batch_size=GLOBAL_BATCH, batch_size=2,
                             eval_every=4, warmup_steps=2)
    config = write_config_file(tmp_path / "run.toml", settings)
    # one process: batch 2 with 2 accumulation steps; the reference
    single = tmp_path / "single"
    run_command(gsa_train_command("--config", str(config), "--run-dir", str(single)), cwd=tmp_path)
    reference = train_losses(single)

    # two processes, FSDP2 (each holds half of every parameter), batch 2 each
    sharded = tmp_path / "sharded"
    output = run_command(torchrun_command(2, "--config", str(config), "--run-dir", str(sharded), "--parallel", "fsdp"),
                         cwd=tmp_path, timeout=180).stdout
    assert "2 process(es) on cpu" in output and "fsdp" in output
    assert_same_losses(train_losses(sharded), reference)

    # the FSDP checkpoint of step 3 continues on one process, then step 6's under DDP on two: same losses still
    moved = tmp_path / "moved"
    run_command(gsa_train_command("--resume", str(sharded / "checkpoints" / "step-00000003"), "--run-dir", str(moved),
                                  "--steps", "8"), cwd=tmp_path)
    assert_same_losses(train_losses(moved), reference[3:])
    replicated = tmp_path / "replicated"
    output = run_command(torchrun_command(2, "--resume", str(sharded / "checkpoints" / "step-00000006"), "--run-dir",
                                          str(replicated), "--parallel", "ddp"), cwd=tmp_path, timeout=180).stdout
    assert "ddp" in output
    assert_same_losses(train_losses(replicated), reference[6:])
