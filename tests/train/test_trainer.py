"""The training loop on one process: a run's outputs, accumulation, exact resume, and checkpoint safety."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from gsa.data import ByteTokenizer
from gsa.models import GSAForCausalLM
from gsa.train import checkpoint as checkpoint_module
from gsa.train import train
from gsa.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, verify_checkpoint
from tests.helpers import rel_err
from tests.train.common import tiny_config, train_losses


def test_a_run_learns_and_leaves_a_usable_model(tmp_path):
    result = train(tiny_config(tmp_path, steps=30, eval_every=10, save_every=10, keep_last=2, sample_tokens=12,
                               sample_prompt="the "))
    losses = [loss for _, loss in train_losses(result.run_dir)]
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5  # the synthetic text is easy to learn a little of
    records = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
    validation = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in validation] == [10, 20, 30]
    assert validation[-1]["val_loss"] < validation[0]["val_loss"]
    assert result.val_perplexity == pytest.approx(torch.tensor(result.val_loss).exp().item())
    assert {"tokens_per_s", "memory_gib", "lr", "grad_norm"} <= set(records[0])
    assert [p.name for p in list_checkpoints(result.run_dir / "checkpoints")] == ["step-00000020", "step-00000030"]
    assert result.loss_plot.stat().st_size > 1000
    # the exported model is the last checkpoint's, loads with from_pretrained, and carries its tokenizer
    model = GSAForCausalLM.from_pretrained(result.model_dir)
    saved = load_file(result.run_dir / "checkpoints" / "step-00000030" / "model" / "model.safetensors")
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in saved.items())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    assert tokenizer("the", add_special_tokens=False)["input_ids"] == ByteTokenizer().encode("the")
    assert result.sample.startswith("the ") and len(result.sample) > 4


def test_accumulation_and_micro_batches_take_the_same_steps(tmp_path):
    whole = train(tiny_config(tmp_path / "a", batch_size=4, save_every=100))
    split = train(tiny_config(tmp_path / "b", batch_size=2, grad_accum=2, save_every=100))
    for (step_a, loss_a), (step_b, loss_b) in zip(train_losses(whole.run_dir), train_losses(split.run_dir)):
        assert step_a == step_b and loss_b == pytest.approx(loss_a, rel=1e-5)
    a = load_file(whole.model_dir / "model.safetensors")
    b = load_file(split.model_dir / "model.safetensors")
    # Adam divides by the gradient's scale, so rounding differences in tiny gradients show in the weights at ~1e-5
    assert all(rel_err(b[n], a[n]) < 1e-4 for n in a)


def test_activation_checkpointing_changes_memory_not_results(tmp_path):
    plain = train(tiny_config(tmp_path / "a", steps=3, save_every=100))
    recomputed = train(tiny_config(tmp_path / "b", steps=3, save_every=100, activation_checkpointing=True))
    for (_, a), (_, b) in zip(train_losses(plain.run_dir), train_losses(recomputed.run_dir)):
        assert b == pytest.approx(a, rel=1e-6)


def test_kept_features_norms_and_states_train_the_same_and_are_the_layers_setting(tmp_path, monkeypatch):
    """--keep-features: every GSA layer and MLP of the trained model keeps its features (and normalised rows) for
    backward; --keep-norms: the normalised rows alone; --keep-states: every GSA layer is set to keep its chunk
    states (on the GPU; the CPU's torch backend keeps what autograd keeps either way); training is the same as with
    recomputation, and the saved model's config keeps its own settings (training-time choices)."""
    from gsa.layers import GatedSlotAttention, SwiGLU
    from gsa.train import trainer as trainer_module

    flags = []
    build = trainer_module.Trainer._build_model

    def build_and_record(self):
        build(self)
        modules = list(self.model.modules())
        flags.append(({m.recompute_features for m in modules if isinstance(m, (GatedSlotAttention, SwiGLU))},
                      {m.recompute_states for m in modules if isinstance(m, GatedSlotAttention)},
                      {m.recompute_norms for m in modules if isinstance(m, (GatedSlotAttention, SwiGLU))}))

    monkeypatch.setattr(trainer_module.Trainer, "_build_model", build_and_record)
    plain = train(tiny_config(tmp_path / "a", steps=3, save_every=100))
    kept = train(tiny_config(tmp_path / "b", steps=3, save_every=100, keep_features=True))
    states = train(tiny_config(tmp_path / "c", steps=3, save_every=100, keep_states=True))
    norms = train(tiny_config(tmp_path / "d", steps=3, save_every=100, keep_norms=True))
    assert flags == [({True}, {True}, {None}), ({False}, {True}, {None}), ({True}, {False}, {None}),
                     ({True}, {True}, {False})]
    assert (train_losses(kept.run_dir) == train_losses(plain.run_dir) == train_losses(states.run_dir)
            == train_losses(norms.run_dir))
    saved = json.loads((kept.model_dir / "config.json").read_text())
    assert saved["recompute_features"] is True and saved["recompute_states"] is True
    assert json.loads((norms.model_dir / "config.json").read_text())["recompute_norms"] is None
    assert json.loads((states.model_dir / "config.json").read_text())["recompute_states"] is True


def test_resume_continues_exactly(tmp_path):
    straight = train(tiny_config(tmp_path, steps=8, save_every=4))
    checkpoint = straight.run_dir / "checkpoints" / "step-00000004"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["samples_seen"] == 16
    resumed = train(tiny_config(tmp_path, steps=8, save_every=4, resume=str(checkpoint),
                                run_dir=str(tmp_path / "resumed")))
    assert train_losses(resumed.run_dir) == train_losses(straight.run_dir)[4:]  # bit-identical
    # training time counts on from the checkpoint's, not from zero: the run's total over its sittings
    assert 0 < state["train_seconds"] < resumed.train_seconds
    a = load_file(straight.model_dir / "model.safetensors")
    b = load_file(resumed.model_dir / "model.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_run_folder_with_checkpoints_is_not_overwritten(tmp_path):
    train(tiny_config(tmp_path, steps=2))
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny_config(tmp_path, steps=2))


def test_damaged_latest_checkpoint_is_reported_and_the_previous_still_loads(tmp_path):
    result = train(tiny_config(tmp_path, steps=6, save_every=3))
    previous, latest = list_checkpoints(result.run_dir / "checkpoints")
    with open(latest / "optimizer.safetensors", "r+b") as file:  # flip one byte in the middle
        file.seek(file.seek(0, 2) // 2)
        byte = file.read(1)
        file.seek(-1, 1)
        file.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="optimizer.safetensors does not match its SHA-256"):
        load_checkpoint(latest)
    assert load_checkpoint(previous).step == 3
    with pytest.raises(CheckpointError, match=f"earlier checkpoint {previous} is intact"):
        train(tiny_config(tmp_path, steps=9, resume="latest"))
    (latest / "model" / "model.safetensors").write_bytes(b"")  # truncated
    with pytest.raises(CheckpointError, match="model/model.safetensors has 0 bytes"):
        verify_checkpoint(latest)
    resumed = train(tiny_config(tmp_path, steps=9, resume=str(previous)))
    assert resumed.step == 9


def test_a_save_that_dies_midway_leaves_nothing_that_looks_like_a_checkpoint(tmp_path, monkeypatch):
    result = train(tiny_config(tmp_path, steps=3, save_every=3))
    config = tiny_config(tmp_path, steps=6, save_every=3, resume="latest")

    def crash(path):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "_fsync", crash)  # every file written, none yet made durable
    with pytest.raises(OSError, match="disk full"):
        train(config)
    monkeypatch.undo()
    checkpoints = result.run_dir / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-00000003"]
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".tmp-")]
    verify_checkpoint(checkpoints / "step-00000003")
    # a staging folder from a save killed outright (no cleanup ran) is ignored, then removed on the next start
    (checkpoints / ".tmp-step-00000006-deadbeef" / "model").mkdir(parents=True)
    (checkpoints / "step-00000009").mkdir()  # and a folder that never got its manifest is not complete
    with pytest.raises(CheckpointError, match="incomplete: it has no manifest.json"):
        verify_checkpoint(checkpoints / "step-00000009")
    (checkpoints / "step-00000009").rmdir()
    train(config)
    assert not (checkpoints / ".tmp-step-00000006-deadbeef").exists()


def test_init_from_starts_from_saved_weights_and_their_tokenizer(tmp_path):
    pretrained = train(tiny_config(tmp_path / "pretrain", steps=30, save_every=30))
    finetune_settings = dict(steps=2, init_from=str(pretrained.model_dir), tokenizer="auto", model_overrides={},
                             lr=1e-4, min_lr=1e-5, warmup_steps=0)
    finetuned = train(tiny_config(tmp_path / "finetune", **finetune_settings))
    fresh = train(tiny_config(tmp_path / "fresh", steps=2, lr=1e-4, min_lr=1e-5, warmup_steps=0))
    assert train_losses(finetuned.run_dir)[0][1] < train_losses(fresh.run_dir)[0][1] - 0.5
    # FSDP2 on a group of one (what `--parallel auto` picks for T2R finetuning on a GPU in bf16) loads the same
    # weights into its managed model: in float32 the steps are the plain run's
    managed = train(tiny_config(tmp_path / "finetune-fsdp", **finetune_settings, parallel="fsdp"))
    for (step, got), (_, want) in zip(train_losses(managed.run_dir), train_losses(finetuned.run_dir), strict=True):
        assert got == pytest.approx(want, rel=1e-5), step
    settings = json.loads((finetuned.run_dir / "train_config.json").read_text())
    assert settings["tokenizer"] == str(pretrained.model_dir)  # "auto" took the folder's own tokenizer
    with pytest.raises(ValueError, match="model_overrides cannot change a model loaded with --init-from"):
        train(tiny_config(tmp_path / "bad", **{**finetune_settings, "model_overrides": {"num_slots": 8}}))


def test_command_line_errors_are_one_clear_line(tmp_path, capsys):
    from gsa.cli import main

    assert main(["train", "--data", str(tmp_path / "missing.txt"), "--run-dir", str(tmp_path / "run")]) == 2
    assert "gsa train: error: data source" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_metrics_reach_tensorboard_when_it_is_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(tiny_config(tmp_path, steps=4, eval_every=2, save_every=4))
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "val_loss", "lr"} <= tags
    logged = [e.value for e in events.Scalars("loss")]
    jsonl = [loss for _, loss in train_losses(result.run_dir)]
    assert logged == pytest.approx(jsonl, rel=1e-6)
