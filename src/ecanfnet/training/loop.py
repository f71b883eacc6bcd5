"""Fine-tuning / training with the card's recipe: SGD Nesterov, cosine with warm-up, AGC 0.015,
label smoothing, RandAugment, dropout and stochastic depth; exact resume from epoch checkpoints;
per-epoch telemetry (metrics.csv, curves.png, TensorBoard: training/telemetry.py).

Every random choice of epoch E (data order, augmentation, dropout) is seeded from (seed, E), and
the training state is saved at the end of each epoch, so a run killed anywhere in epoch E and
resumed replays epoch E from the same state and ends with bitwise the same weights (CPU).
"""

from __future__ import annotations

import os
import warnings
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..distributed import DistContext, barrier, context_or_own, restart_attempt, say
from ..errors import TrainingError  # noqa: F401 (re-exported)
from ..evaluate import evaluate_loader
from ..model import ECANFNet
from ..progress import progress as progress_reporter
from ..transforms import eval_transform
from ..factory import create_model
from ..publish import write_model_card
from ..weights import save_pretrained
from .agc import adaptive_clip_grad_, unit_count
from .card import RunFacts
from .config import AUTOCAST_DTYPES, Schedule, TrainConfig, describe_resolved, resolve, steps_per_epoch
from .data import ImageFolderDataset, collate_skipping_bad, log_unreadable, read_samples, train_transform
from .state import TrainState, adopt_legacy_run, check_output, forget_previous_run, state_file, training_dir
from .telemetry import EpochMeter, Recorder, recorder


def train(cfg: TrainConfig, *, context: DistContext | None = None) -> Path:
    """Run (or resume) training; returns OUT, a folder to publish: the best weights, config.json with the labels,
    and the model card README.md. The training state and byproducts go to OUT.training (state.training_dir).

    context: this process's place in a multi-process run (distributed.distributed_context); None: a lone
    process on cfg.device, no process group."""
    with _deterministic_algorithms(cfg.deterministic), context_or_own(context, cfg.device) as ctx:
        return _run(cfg, ctx)


def _run(cfg: TrainConfig, ctx: DistContext) -> Path:
    out = Path(cfg.output)
    check_output(out, cfg.resume, cfg.overwrite)
    # torchrun --max-restarts starts the group again after a worker died: it carries on from the last saved epoch
    resuming = cfg.resume or restart_attempt() > 0
    if ctx.rank == 0:
        if resuming:
            adopt_legacy_run(out)  # a run of an earlier version, whose state is inside OUT
        elif cfg.overwrite:
            forget_previous_run(out)  # a restart of this run must never resume the replaced one
    barrier()  # the other ranks read the state where rank 0 left it
    classes, train_samples, val_samples = read_samples(cfg.data, cfg.val, val_split=cfg.val_split, seed=cfg.seed)
    model = _initial_model(cfg, classes)
    steps = steps_per_epoch(cfg, len(train_samples), ctx.world)
    cfg = resolve(cfg, image_size=int(model.pretrained_cfg["input_size"][-1]), steps=steps, world=ctx.world)
    train_ds, val_ds = _datasets(cfg, model, train_samples, val_samples)
    facts = RunFacts.of(cfg, world=ctx.world, architecture=model.name, pretrained_cfg=model.pretrained_cfg,
                        classes=classes, train_samples=train_samples, val_samples=val_samples)
    state = TrainState.start(model, cfg, ctx)
    if resuming and state_file(out).is_file():
        state.resume(state_file(out), check_settings=not cfg.resume_with_changes)
        say(f"resuming {out} after epoch {state.epoch}", ctx.rank)
    net, sampler = _distributed(model, train_ds, cfg.seed, ctx)
    schedule, mix = Schedule.of(cfg, steps), _batch_mixer(cfg, len(classes))
    if state.epoch < cfg.epochs:  # the resolved settings, once, when there is anything left to train
        say(describe_resolved(cfg, steps, ctx.world), ctx.rank)
    with _recorder(state, out, len(classes), cfg.epochs) as record:
        for epoch in range(state.epoch, cfg.epochs):
            loader = _train_loader(train_ds, sampler, cfg, epoch, ctx.rank)
            meter = _train_epoch(state, net, loader, cfg, schedule, mix=mix)
            state.epoch = epoch + 1
            if ctx.world > 1:
                _check_ranks_in_sync(state)
            if ctx.rank == 0:
                _validate_and_save(state, val_ds, cfg, meter, facts, record=record)
            barrier()
    if ctx.rank == 0 and state.history and (out / "model.safetensors").is_file():
        write_model_card(out, facts.summary(state.history))  # the final card: every epoch's metrics
    return out


@contextmanager
def _deterministic_algorithms(on: bool) -> Iterator[None]:
    """torch's deterministic algorithms for the run when asked for (on as well if they already were), then as before."""
    if on:
        # cuBLAS is only deterministic with a fixed workspace; without it CUDA matmuls raise in deterministic mode
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on or was_deterministic)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _recorder(state: TrainState, out: Path, num_classes: int,
              epochs: int) -> AbstractContextManager[Recorder | None]:
    """Rank 0's telemetry Recorder in OUT.training while there are epochs left to train; None elsewhere."""
    if state.context.rank != 0 or state.epoch >= epochs:
        return nullcontext(None)
    return recorder(training_dir(out), state.history, num_classes)


def _initial_model(cfg: TrainConfig, classes: list[str]) -> ECANFNet:
    """The model to start from (its new classifier seeded by cfg.seed), labelled with the class names."""
    torch.manual_seed(cfg.seed)  # the new classifier's initialisation
    source = False if cfg.from_scratch else (cfg.weights if cfg.weights is not None else True)
    with warnings.catch_warnings():
        # the new head is expected: the dataset has its own classes (weights.load_checkpoint's warning)
        warnings.filterwarnings("ignore", message=r"(?s).*: the checkpoint's classifier .*loaded the backbone only",
                                category=UserWarning)
        model = create_model(pretrained=source, num_classes=len(classes), drop_rate=cfg.drop_rate,
                             drop_path_rate=cfg.drop_path_rate)
    if cfg.freeze_backbone:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head."))
    model.pretrained_cfg = model.pretrained_cfg.replace(label_names=tuple(classes))
    return model


def _datasets(cfg: TrainConfig, model: ECANFNet, train_samples: list[tuple[str, int]],
              val_samples: list[tuple[str, int]]) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """Training set (augmented) and validation set (the preprocessing the model records for test time)."""
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    augment = train_transform(cfg.image_size, mean, std, randaugment=cfg.randaugment, crop_scale=cfg.crop_scale,
                              hflip=cfg.hflip)
    train_ds = ImageFolderDataset(train_samples, augment)
    # OUT records the preprocessing validation uses, so predict/evaluate/timm reproduce the validation numbers
    model.pretrained_cfg = model.pretrained_cfg.as_trained_at(cfg.image_size)
    return train_ds, ImageFolderDataset(val_samples, eval_transform(model.pretrained_cfg))


def _distributed(model: ECANFNet, train_ds: ImageFolderDataset, seed: int,
                 ctx: DistContext) -> tuple[nn.Module, Any]:
    """(network to train, sampler): the model itself and None alone, DDP and a DistributedSampler in a group."""
    if ctx.world <= 1:
        return model, None
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data.distributed import DistributedSampler

    device = ctx.device
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return net, DistributedSampler(train_ds, ctx.world, ctx.rank, shuffle=True, seed=seed)


def _batch_mixer(cfg: TrainConfig, num_classes: int) -> Callable | None:
    """torchvision's MixUp / CutMix on whole batches (one of them per batch when both are on), or None."""
    if not (cfg.mixup or cfg.cutmix):
        return None
    from torchvision.transforms import v2

    mixers = ([v2.MixUp(alpha=cfg.mixup, num_classes=num_classes)] if cfg.mixup else []) + \
             ([v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes)] if cfg.cutmix else [])
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def _train_loader(train_ds: ImageFolderDataset, sampler: Any, cfg: TrainConfig, epoch: int,
                  rank: int) -> DataLoader:
    """The batches of one epoch, every random choice in them (and in dropout) seeded from (seed, epoch, rank)."""
    torch.manual_seed(cfg.seed * 100_003 + epoch + 7_919 * rank)
    if sampler is not None:
        sampler.set_epoch(epoch)
    return DataLoader(train_ds, cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                      num_workers=cfg.workers, collate_fn=collate_skipping_bad, drop_last=False,
                      generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))


def _train_epoch(state: TrainState, net: nn.Module, loader: DataLoader, cfg: TrainConfig, schedule: Schedule, *,
                 mix: Callable | None) -> EpochMeter:
    """One epoch; `net` is the model itself or its DistributedDataParallel wrapper. Returns its measurements,
    reduced over the ranks."""
    net.train()
    epoch = state.epoch
    clip_params = [p for n, p in state.model.named_parameters() if p.requires_grad and not n.startswith("head.fc")]
    meter = EpochMeter(agc_units=unit_count(clip_params) if cfg.agc_clip > 0 else 0)
    state.optimizer.zero_grad(set_to_none=True)
    with progress_reporter(len(loader), f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
                           enabled=cfg.progress and state.context.rank == 0) as bar:
        for i, (x, y, errors) in enumerate(loader):
            bar.update(1)
            log_unreadable(errors, state.reported)
            if x is None:
                continue
            x, y = x.to(state.device), y.to(state.device)
            loss = _loss(net, x, y, cfg, mix=mix)
            if not _finite_everywhere(loss):
                raise TrainingError(f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {i + 1}; stopped. "
                                    f"The last good checkpoint (end of epoch {epoch}) is kept in {cfg.output}")
            state.scaler.scale(loss / cfg.accum_steps).backward()
            if (i + 1) % cfg.accum_steps == 0 or i + 1 == len(loader):
                lr = schedule.lr(epoch, i // cfg.accum_steps)
                meter.step(lr, _optimizer_step(state, clip_params, lr, cfg.agc_clip))
            meter.batch(loss.item(), len(y))
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{meter.lr:.2e}", img_s=f"{meter.images_per_s():.1f}")
    meter.finish(state.context)  # first: all ranks then agree whether there were any images
    if not meter.images:
        raise TrainingError(f"{cfg.data}: no readable training images in epoch {epoch + 1}")
    return meter


def _loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, *, mix: Callable | None) -> torch.Tensor:
    """The batch's label-smoothed cross-entropy (on MixUp / CutMix targets when on), computed under autocast."""
    target = y
    if mix is not None:
        x, target = mix(x, y)
    with torch.autocast(x.device.type, dtype=AUTOCAST_DTYPES[cfg.precision], enabled=cfg.precision != "fp32"):
        logits = net(x)
    return nn.functional.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)


def _optimizer_step(state: TrainState, clip_params: list[nn.Parameter], lr: float, agc_clip: float) -> int:
    """Unscale the gradients, clip them (AGC), step at lr, clear them, and move the weight EMA; returns how many
    gradient units AGC clipped."""
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.scaler.unscale_(state.optimizer)
    clipped = adaptive_clip_grad_(clip_params, agc_clip) if agc_clip > 0 else 0
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:
        state.ema.update_parameters(state.model)
    return clipped


def _finite_everywhere(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (so that all ranks stop together and none hangs)."""
    import torch.distributed as dist

    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def _check_ranks_in_sync(state: TrainState) -> None:
    """All-gather a float64 checksum of the weights; stop if any rank has drifted."""
    import torch.distributed as dist

    world = state.context.world
    checksum = torch.stack([p.detach().double().sum() for p in state.model.parameters()]).sum().reshape(1)
    sums = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(sums, checksum)
    values = [float(v) for v in sums]
    if len(set(values)) != 1:
        raise TrainingError(f"epoch {state.epoch}: the {world} ranks' weights differ (checksums {values})")
    say(f"epoch {state.epoch}: {world} ranks in sync (weight checksum {values[0]:.6f})", state.context.rank)


def _validate_and_save(state: TrainState, val_ds: ImageFolderDataset, cfg: TrainConfig, meter: EpochMeter,
                       facts: RunFacts, *, record: Recorder) -> None:
    """Rank 0 after each epoch: validate the weights to export; when they are the best so far save them in OUT with
    their model card; record the epoch's metrics (telemetry) and save the training state to OUT.training."""
    out, epoch, final = Path(cfg.output), state.epoch, state.final_model
    loader = DataLoader(val_ds, cfg.batch_size, collate_fn=collate_skipping_bad, num_workers=cfg.workers)
    metrics = evaluate_loader(final, loader, state.reported, device=state.device,
                              progress=f"epoch {epoch}/{cfg.epochs}: validate" if cfg.progress else None)
    state.history.append({"epoch": epoch, "train_loss": meter.train_loss, **metrics, **meter.row()})
    if metrics["val_top1"] > state.best:
        state.best = metrics["val_top1"]
        save_pretrained(final, out, label_names=state.model.pretrained_cfg["label_names"])
        write_model_card(out, facts.summary(state.history))
    record.record(state.history)  # before the state: a resume purges what a run killed in between recorded
    state.save(state_file(out))
    say(f"epoch {epoch}/{cfg.epochs}: train loss {meter.train_loss:.4f}, val loss {metrics['val_loss']:.4f}, "
        f"top-1 {metrics['val_top1']:.3f}, top-5 {metrics['val_top5']:.3f}", state.context.rank)
