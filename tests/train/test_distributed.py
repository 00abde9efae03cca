"""torchrun on CPU (gloo): 2-process FSDP2 takes the same steps as one process with the same global batch, and its
checkpoints resume on another number of processes and under DDP; FSDP2 on one process (a group of its own) takes
the plain run's steps too."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

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
def test_fsdp_and_ddp_match_one_plain_process(tmp_path):
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
                                  "--steps", "8", "--parallel", "none"), cwd=tmp_path)
    assert_same_losses(train_losses(moved), reference[3:])
    replicated = tmp_path / "replicated"
    output = run_command(torchrun_command(2, "--resume", str(sharded / "checkpoints" / "step-00000006"), "--run-dir",
                                          str(replicated), "--parallel", "ddp"), cwd=tmp_path, timeout=180).stdout
    assert "ddp" in output
    assert_same_losses(train_losses(replicated), reference[6:])

    # `--parallel fsdp` without torchrun: the process joins a group of its own and FSDP2 manages the model (on a
    # GPU, bf16 compute over float32 master weights); in float32 the steps are the plain run's, and its checkpoints
    # are gathered whole (the exported weights are the plain run's)
    managed = tmp_path / "managed"
    output = run_command(gsa_train_command("--config", str(config), "--run-dir", str(managed), "--parallel", "fsdp"),
                         cwd=tmp_path).stdout
    assert "1 process(es) on cpu" in output and "single process, fsdp" in output
    assert_same_losses(train_losses(managed), reference)
    whole, plain = (load_file(run / "model" / "model.safetensors") for run in (managed, single))
    assert whole.keys() == plain.keys()  # gathered whole: plain names and shapes, no shards
    assert all(torch.allclose(whole[name], plain[name], rtol=1e-4, atol=1e-6) for name in plain)
