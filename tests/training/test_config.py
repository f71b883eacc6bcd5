"""TrainConfig is frozen and resolved once: defaults filled in a copy, the recorded settings, the schedule;
the distributed context a run gets without one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ecanfnet.distributed import DistContext, context_or_own, single_process
from ecanfnet.errors import TrainingError
from ecanfnet.training.config import (RESUMABLE_CHANGES, Schedule, TrainConfig, default_epochs, default_lr,
                                      describe_resolved, lr_at, resolve, run_settings, steps_per_epoch)


def test_a_config_cannot_be_changed_after_it_is_made():
    cfg = TrainConfig(data="d", output="o")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3
    assert dataclasses.replace(cfg, epochs=3).epochs == 3 and cfg.epochs is None


def test_resolve_fills_the_defaults_in_a_copy_and_keeps_what_was_given():
    cfg = TrainConfig(data="d", output="o", from_scratch=True, batch_size=8, accum_steps=2)
    steps = steps_per_epoch(cfg, train_images=100, world=2)
    assert steps == 4  # 50 images a rank: 7 batches of 8, in groups of 2
    resolved = resolve(cfg, image_size=224, steps=steps, world=2)
    assert (cfg.epochs, cfg.lr, cfg.image_size) == (None, None, None)  # the given config is left as it was
    assert resolved.epochs == default_epochs(True, 4) == 75  # at least 300 steps
    assert resolved.lr == default_lr(8 * 2 * 2, from_scratch=True) and resolved.image_size == 224
    assert dataclasses.replace(resolved, epochs=None, lr=None, image_size=None) == cfg
    given = dataclasses.replace(cfg, epochs=3, lr=0.02, image_size=64)
    assert resolve(given, image_size=224, steps=steps, world=2) == given
    line = describe_resolved(resolved, steps, 2)
    assert "75 epochs of 4 optimizer steps" in line and "global batch 32" in line and "image size 224" in line


def test_resolve_refuses_an_unknown_precision():
    with pytest.raises(TrainingError, match="precision must be one of .*, got 'fp8'"):
        resolve(TrainConfig(data="d", output="o", precision="fp8"), image_size=64, steps=1, world=1)


def test_recorded_settings_are_the_resolved_ones_without_run_control_options():
    cfg = resolve(TrainConfig(data="d", output="o", workers=3, device="cpu"), image_size=96, steps=4, world=1)
    settings = run_settings(cfg, world=1)
    assert not set(RESUMABLE_CHANGES) & set(settings)
    assert settings["lr"] == cfg.lr and settings["image_size"] == 96 and settings["processes"] == 1
    assert settings["crop_scale"] == list(cfg.crop_scale)  # plain types: the state loads with weights_only
    assert list(settings)[-1] == "processes"


def test_schedule_is_lr_at_over_the_whole_run():
    cfg = resolve(TrainConfig(data="d", output="o", epochs=4, lr=0.4, warmup_epochs=0.5), image_size=64, steps=6,
                  world=1)
    schedule = Schedule.of(cfg, 6)
    assert (schedule.total, schedule.warmup, schedule.peak) == (24, 3, 0.4)
    assert [schedule.lr(e, s) for e in range(4) for s in range(6)] == [lr_at(i, 24, 3, 0.4) for i in range(24)]


def test_without_a_context_a_run_is_a_lone_process_on_the_device_asked_for(monkeypatch):
    import torch.distributed as dist

    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(name, raising=False)
    with context_or_own(None, "cpu") as ctx:
        assert ctx == DistContext(0, 1, 0, torch.device("cpu")) and not dist.is_initialized()
    assert single_process().device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_under_torchrun_without_a_context_a_run_is_refused(monkeypatch):
    """N ranks each doing the whole job into one output would be wrong: the caller must pass their context."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="launched by torchrun with 2 processes but given no context"):
        with context_or_own(None, "cpu"):
            pass


def test_distributed_context_leaves_only_a_group_it_joined(monkeypatch):
    import torch.distributed as dist

    from ecanfnet.distributed import distributed_context

    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(name, raising=False)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with distributed_context("cpu") as ctx:
            assert (ctx.rank, ctx.world, ctx.device) == (0, 1, torch.device("cpu"))
        assert dist.is_initialized()  # the caller's group, not the context's
    finally:
        dist.destroy_process_group()
