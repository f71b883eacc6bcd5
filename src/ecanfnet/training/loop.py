"""Fine-tuning / training with the card's recipe: SGD Nesterov, cosine with warm-up, AGC 0.015,
label smoothing, RandAugment, dropout and stochastic depth; exact resume from epoch checkpoints.

Every random choice of epoch E (data order, augmentation, dropout) is seeded from (seed, E), and
the training state is saved at the end of each epoch, so a run killed anywhere in epoch E and
resumed replays epoch E from the same state and ends with bitwise the same weights (CPU).
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..distributed import barrier, distributed_setup, launch_rank, leave_process_group, restart_attempt, say
from ..errors import TrainingError  # noqa: F401 (re-exported)
from ..fileio import check_output_dir, write_atomically, write_csv_atomically
from ..folded import PRECISIONS
from ..model import ECANFNet
from ..progress import progress as progress_reporter
from ..transforms import eval_transform
from ..weights import TorchLoadError, WeightsSource, create_model, safe_torch_load, save_pretrained, torch_error_line
from .agc import adaptive_clip_grad_
from .data import DEFAULT_CROP_SCALE, ImageFolderDataset, collate_skipping_bad, scan_image_folder, split_samples, train_transform
from .evaluate import Tally

STATE_FILE = "training/last.pt"
# What a run writes into OUT; finding any of them there means OUT already holds a run (see _check_output).
OUTPUT_FILES = ("config.json", "model.safetensors", STATE_FILE, "metrics.csv")
STATE_KEYS = ("model", "optimizer", "epoch", "best", "history")
AUTOCAST_DTYPES = PRECISIONS  # precision name -> the dtype autocast computes in (fp32: autocast off)
METRICS_FILE = "metrics.csv"

log = logging.getLogger("ecanfnet")


@dataclass
class TrainConfig:
    """Every setting of a run; the defaults are the card's recipe scaled to small datasets."""

    data: str
    output: str
    val: str | None = None
    val_split: float = 0.1
    weights: WeightsSource | None = None       # None: the published checkpoint
    from_scratch: bool = False
    epochs: int | None = None                   # None: default_epochs(from_scratch, steps per epoch)
    batch_size: int = 32
    lr: float | None = None                     # None: default_lr(global batch, from_scratch)
    weight_decay: float = 2e-5                  # not applied to gains and biases
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    agc_clip: float = 0.015                     # 0 disables AGC
    drop_rate: float = 0.2
    drop_path_rate: float = 0.1
    image_size: int | None = None               # None: the checkpoint's input_size (224 for L0's weights)
    randaugment: bool = True
    crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE  # RandomResizedCrop area range
    hflip: float = 0.5                          # horizontal flip probability
    freeze_backbone: bool = False
    accum_steps: int = 1                        # gradient accumulation: optimizer step every N batches
    precision: str = "fp32"                     # "bf16" (autocast) or "fp16" (autocast + grad scaler; emulated on CPU)
    ema_decay: float = 0.0                      # e.g. 0.9998; 0 disables the weight EMA
    mixup: float = 0.0                          # MixUp alpha; 0 disables
    cutmix: float = 0.0                         # CutMix alpha; 0 disables (both on: one per batch)
    workers: int = 0
    seed: int = 0
    deterministic: bool = False
    resume: bool = False                        # continue OUT's training state (also implied by a torchrun restart)
    resume_with_changes: bool = False           # resume even where settings differ from the run's (refused otherwise)
    overwrite: bool = False                     # replace the model / training state already in OUT
    progress: bool = True
    history: list[dict[str, float]] = field(default_factory=list, repr=False)


# From random init on a small dataset the card's rate moves too slowly under AGC 0.015, and 10 epochs
# are too few: on the digits benchmark 1x/10 epochs reached 61 % val top-1, 8x/10 epochs 82 %,
# 8x/30 epochs 93 %, with crops kept above 35 % of the area 96 % after 30 epochs, 96.7 % after 40 and
# 97.2 % after 60 (docs/benchmarks.md).
FROM_SCRATCH_LR_MULTIPLIER = 8.0
FINE_TUNE_EPOCHS, FROM_SCRATCH_EPOCHS = 10, 60
# A small folder gives few steps per epoch: 20 images in each of 5 classes is 3 batches of 32, so 10 epochs
# would be 30 SGD steps; fine-tuned that way a backbone reached 55 % where 100 epochs reached 89 %
# (docs/benchmarks.md, few-shot digits). So the default epochs always give at least this many steps.
MIN_DEFAULT_STEPS = 300


def default_epochs(from_scratch: bool, steps_per_epoch: int) -> int:
    """10 epochs to fine-tune, 60 from random init, and in both cases at least MIN_DEFAULT_STEPS optimizer steps."""
    base = FROM_SCRATCH_EPOCHS if from_scratch else FINE_TUNE_EPOCHS
    return max(base, math.ceil(MIN_DEFAULT_STEPS / steps_per_epoch))


def default_lr(global_batch: int, from_scratch: bool = False) -> float:
    """Peak learning rate: 0.1 x global batch / 256 (NFNet paper) to fine-tune; 8x that from random init."""
    return 0.1 * global_batch / 256 * (FROM_SCRATCH_LR_MULTIPLIER if from_scratch else 1.0)


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns OUT, a hub-layout folder holding the best weights and labels."""
    if cfg.deterministic:
        # cuBLAS is only deterministic with a fixed workspace; without it CUDA matmuls raise in deterministic mode
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(cfg.deterministic or was_deterministic)
    try:
        return _train(cfg)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        leave_process_group()  # here, not at interpreter exit (see distributed.py)


def _train(cfg: TrainConfig) -> Path:
    out = Path(cfg.output)
    _check_output(out, cfg.resume, cfg.overwrite)
    # torchrun --max-restarts starts the group again after a worker died: it carries on from the last saved epoch
    resuming = cfg.resume or restart_attempt() > 0
    if cfg.overwrite and not resuming and launch_rank() == 0:
        (out / STATE_FILE).unlink(missing_ok=True)  # a restart of this run must never resume the replaced one
    classes, model, train_ds, val_ds = _model_and_data(cfg)
    if cfg.precision not in AUTOCAST_DTYPES:
        raise TrainingError(f"precision must be one of {', '.join(AUTOCAST_DTYPES)}, got {cfg.precision!r}")
    rank, world, device = distributed_setup()
    scaler = _grad_scaler(cfg.precision, device)
    model.to(device)
    optimizer = _optimizer(model, cfg)
    ema = _ema(model, cfg.ema_decay)
    mix = _batch_mixer(cfg, len(classes))
    per_rank = math.ceil(len(train_ds) / world)
    steps_per_epoch = max(1, math.ceil(math.ceil(per_rank / cfg.batch_size) / cfg.accum_steps))
    if cfg.epochs is None:
        cfg.epochs = default_epochs(cfg.from_scratch, steps_per_epoch)
    lr = cfg.lr if cfg.lr is not None else default_lr(cfg.batch_size * cfg.accum_steps * world, cfg.from_scratch)
    start_epoch, best, settings = 0, -1.0, _run_settings(cfg, lr, world)
    state_path = out / STATE_FILE
    if resuming and state_path.is_file():
        start_epoch, best, cfg.history = _load_state(state_path, model, optimizer, ema, scaler,
                                                     None if cfg.resume_with_changes else settings)
        say(f"resuming {out} after epoch {start_epoch}", rank)
    net, sampler = _distributed(model, train_ds, cfg.seed, rank, world, device)
    reported: set[str] = set()
    for epoch in range(start_epoch, cfg.epochs):
        _seed_epoch(cfg.seed, epoch, rank)
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader = DataLoader(train_ds, cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                            num_workers=cfg.workers, collate_fn=collate_skipping_bad, drop_last=False,
                            generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        train_loss = _train_epoch(net, loader, optimizer, scaler, cfg, epoch, lr, steps_per_epoch, reported,
                                  ema, mix, device, rank)
        if world > 1:
            _check_ranks_in_sync(model, epoch, rank, world)
        if rank == 0:
            final = ema.module if ema is not None else model  # the weights that are validated and exported
            metrics = evaluate_loader(final, DataLoader(val_ds, cfg.batch_size, collate_fn=collate_skipping_bad,
                                                        num_workers=cfg.workers), reported, device,
                                      progress=f"epoch {epoch + 1}/{cfg.epochs}: validate" if cfg.progress else None)
            row = {"epoch": epoch + 1, "train_loss": train_loss, **metrics}
            cfg.history.append(row)
            if metrics["val_top1"] > best:
                best = metrics["val_top1"]
                save_pretrained(final, out, label_names=classes)
            _save_state(state_path, model, optimizer, ema, scaler, epoch + 1, best, cfg.history, settings)
            write_csv_atomically(out / METRICS_FILE, cfg.history, list(cfg.history[0]))
            _plot_curves(out, cfg.history)
            say(f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}, val loss {metrics['val_loss']:.4f}, "
                 f"top-1 {metrics['val_top1']:.3f}, top-5 {metrics['val_top5']:.3f}", rank)
        barrier()
    return out


def _model_and_data(cfg: TrainConfig) -> tuple[list[str], ECANFNet, ImageFolderDataset, ImageFolderDataset]:
    """Class names, the initial model (labels and test-time preprocessing recorded), training and validation sets."""
    classes, train_samples, val_samples = _read_samples(cfg)
    torch.manual_seed(cfg.seed)  # the new classifier's initialisation
    model = _initial_model(cfg, len(classes))
    model.pretrained_cfg["label_names"] = classes
    if cfg.image_size is None:
        cfg.image_size = int(model.pretrained_cfg["input_size"][-1])
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    augment = train_transform(cfg.image_size, mean, std, cfg.randaugment, cfg.crop_scale, cfg.hflip)
    train_ds = ImageFolderDataset(train_samples, augment)
    # OUT records the preprocessing validation uses, so predict/evaluate/timm reproduce the validation numbers
    model.pretrained_cfg.update(preprocessing_as_trained(cfg.image_size))
    val_ds = ImageFolderDataset(val_samples, eval_transform(model.pretrained_cfg))
    return classes, model, train_ds, val_ds


def _grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """fp16: gradients scaled against underflow and unscaled before AGC; a no-op scaler otherwise."""
    if precision == "fp16" and device.type != "cuda":
        warnings.warn("fp16 training on CPU is emulated and slow (it exists to check the fp16 path); "
                      "use --precision bf16 or fp32 on CPU", stacklevel=3)
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def _distributed(model: ECANFNet, train_ds: ImageFolderDataset, seed: int, rank: int, world: int,
                 device: torch.device) -> tuple[nn.Module, Any]:
    """(network to train, sampler): the model itself and None alone, DDP and a DistributedSampler under torchrun."""
    if world <= 1:
        return model, None
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data.distributed import DistributedSampler

    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return net, DistributedSampler(train_ds, world, rank, shuffle=True, seed=seed)


def _read_samples(cfg: TrainConfig) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """Class names and the (training, validation) samples of cfg.data (and cfg.val); at least 2 classes."""
    classes, samples = scan_image_folder(cfg.data)
    if len(classes) < 2:
        raise TrainingError(f"{cfg.data}: found {len(classes)} class folder ({', '.join(classes)}); a classifier "
                            f"needs at least 2 (DATA/CLASS_NAME/IMAGE files, one subfolder per class)")
    if not cfg.val:
        return (classes, *split_samples(samples, cfg.val_split, cfg.seed))
    val_classes, val_samples = scan_image_folder(cfg.val)
    if val_classes != classes:
        raise TrainingError(f"{cfg.val}: its class folders {val_classes} differ from {cfg.data}'s {classes}")
    return classes, samples, val_samples


def _check_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse, before any work, an OUT that is a file, cannot be created, or holds a run that would be replaced."""
    if resume and overwrite:
        raise TrainingError("--resume and --overwrite contradict each other: continue OUT, or replace it")
    try:
        check_output_dir(out)
    except NotADirectoryError as exc:
        raise TrainingError(f"{out}: {exc.strerror}; name a folder for the model") from None
    except OSError as exc:  # the nearest existing folder refuses new files (permissions, /proc, read-only mount)
        raise TrainingError(f"{out}: {exc.strerror}") from None
    held = [name for name in OUTPUT_FILES if (out / name).exists()]
    restarted = restart_attempt() > 0  # by torchrun: OUT holds this very run's last saved epoch
    if held and not (resume or overwrite or restarted):
        raise TrainingError(f"{out}: already holds a model or training state ({', '.join(held)}); "
                            f"pass --resume to continue that run, or --overwrite to replace it")
    if held and resume and not restarted and not (out / STATE_FILE).exists():
        raise TrainingError(f"{out}: holds a model ({', '.join(held)}) but no training state ({STATE_FILE}) to "
                            f"resume; pass --overwrite to replace it with a new run")


def preprocessing_as_trained(image_size: int) -> dict[str, Any]:
    """Test-time settings of a model trained at image_size: that size, whole image (no centre crop)."""
    return {"input_size": [3, image_size, image_size], "test_input_size": [3, image_size, image_size],
            "crop_pct": 1.0, "test_crop_pct": 1.0}


def _initial_model(cfg: TrainConfig, num_classes: int) -> ECANFNet:
    source = False if cfg.from_scratch else (cfg.weights if cfg.weights is not None else True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the new head is expected: the dataset has its own classes
        model = create_model(pretrained=source, num_classes=num_classes, drop_rate=cfg.drop_rate,
                             drop_path_rate=cfg.drop_path_rate)
    if cfg.freeze_backbone:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head."))
    return model


def _optimizer(model: ECANFNet, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith((".gain", ".bias")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, nesterov=True)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to peak over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, progress)))


def _check_ranks_in_sync(model: nn.Module, epoch: int, rank: int, world: int) -> None:
    """All-gather a float64 checksum of the weights; stop if any rank has drifted."""
    import torch.distributed as dist

    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    sums = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(sums, checksum)
    values = [float(v) for v in sums]
    if len(set(values)) != 1:
        raise TrainingError(f"epoch {epoch + 1}: the {world} ranks' weights differ (checksums {values})")
    say(f"epoch {epoch + 1}: {world} ranks in sync (weight checksum {values[0]:.6f})", rank)


def _ema(model: ECANFNet, decay: float):
    """An exponential moving average of the weights (torch's AveragedModel), or None when decay is 0."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))


def _batch_mixer(cfg: TrainConfig, num_classes: int):
    """torchvision's MixUp / CutMix on whole batches (one of them per batch when both are on), or None."""
    if not (cfg.mixup or cfg.cutmix):
        return None
    from torchvision.transforms import v2

    mixers = ([v2.MixUp(alpha=cfg.mixup, num_classes=num_classes)] if cfg.mixup else []) + \
             ([v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes)] if cfg.cutmix else [])
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def _train_epoch(net: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, scaler, cfg: TrainConfig,
                 epoch: int, peak_lr: float, steps_per_epoch: int, reported: set[str], ema, mix,
                 device: torch.device, rank: int) -> float:
    """One epoch; `net` is the model itself or its DistributedDataParallel wrapper. Returns the mean loss."""
    net.train()
    bar = progress_reporter(len(loader), f"epoch {epoch + 1}/{cfg.epochs}", enabled=cfg.progress and rank == 0,
                            unit="batch", leave=False)
    with bar:
        loss_sum, seen, _ = _train_steps(net, loader, bar, optimizer, scaler, cfg, epoch, peak_lr, steps_per_epoch,
                                          reported, ema, mix, device)
    if not seen:
        raise TrainingError(f"{cfg.data}: no readable training images in epoch {epoch + 1}")
    return loss_sum / seen


def _train_steps(net: nn.Module, loader: DataLoader, bar, optimizer: torch.optim.Optimizer, scaler,
                 cfg: TrainConfig, epoch: int, peak_lr: float, steps_per_epoch: int, reported: set[str], ema, mix,
                 device: torch.device) -> tuple[float, int, float]:
    """The batches of one epoch: (sum of per-image losses, images seen, last learning rate)."""
    model = net.module if hasattr(net, "module") else net
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    clip_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.fc")]
    total, warmup = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    losses, seen, start = [], 0, time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    lr = 0.0
    for i, (x, y, errors) in enumerate(loader):
        bar.update(1)
        _report(errors, reported)
        if x is None:
            continue
        x, y = x.to(device), y.to(device)
        target = y
        if mix is not None:
            x, target = mix(x, y)
        with torch.autocast(device.type, dtype=AUTOCAST_DTYPES[cfg.precision], enabled=cfg.precision != "fp32"):
            logits = net(x)
        loss = criterion(logits.float(), target)
        if not _finite_everywhere(loss):
            raise TrainingError(f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {i + 1}; stopped. "
                                f"The last good checkpoint (end of epoch {epoch}) is kept in {cfg.output}")
        scaler.scale(loss / cfg.accum_steps).backward()
        if (i + 1) % cfg.accum_steps == 0 or i + 1 == len(loader):
            lr = lr_at(epoch * steps_per_epoch + i // cfg.accum_steps, total, warmup, peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            scaler.unscale_(optimizer)
            if cfg.agc_clip > 0:
                adaptive_clip_grad_(clip_params, cfg.agc_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update_parameters(model)
        losses.append(loss.item() * len(y))
        seen += len(y)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", img_s=f"{seen / (time.perf_counter() - start):.1f}")
    return sum(losses), seen, lr


def _finite_everywhere(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (so that all ranks stop together and none hangs)."""
    import torch.distributed as dist

    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


@torch.no_grad()
def evaluate_loader(model: nn.Module, loader: DataLoader, reported: set[str],
                    device: torch.device | None = None, progress: str | None = None) -> dict[str, float]:
    """Validation loss, top-1 and top-5 of model over a loader of collate_skipping_bad batches.

    progress: a label to report progress under on stderr (a bar on a terminal, a few lines in a log); None: silent.
    """
    model.eval()
    tally = Tally()
    with progress_reporter(len(loader.dataset), progress or "", enabled=progress is not None, leave=False) as bar:
        for x, y, errors in loader:
            _report(errors, reported)
            if x is not None:
                tally.add(model(x.to(device or x.device)).cpu(), y)
            bar.update((len(x) if x is not None else 0) + len(errors))
    loss, top1, top5 = tally.totals()
    return {"val_loss": loss, "val_top1": top1, "val_top5": top5}


def _report(errors: list[str], reported: set[str]) -> None:
    """Log each unreadable-image reason once (a warning on the "ecanfnet" logger)."""
    for err in errors:
        if err not in reported:
            reported.add(err)
            log.warning("skipped unreadable image: %s", err)


def _seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    torch.manual_seed(seed * 100_003 + epoch + 7_919 * rank)


# TrainConfig fields a resume may change: those that steer the run rather than decide its result, and
# epochs (to train a finished run longer; the learning-rate schedule then stretches to the new length).
RESUMABLE_CHANGES = ("output", "workers", "resume", "resume_with_changes", "overwrite", "progress", "history", "epochs")


def _run_settings(cfg: TrainConfig, lr: float, world: int) -> dict[str, Any]:
    """What decides a run's result, resolved (learning rate, processes): saved with its training state."""
    settings = {name: getattr(cfg, name) for name in cfg.__dataclass_fields__ if name not in RESUMABLE_CHANGES}
    settings.update(lr=lr, processes=world)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}  # plain types: weights_only


def _changed_settings(saved: Any, now: dict[str, Any]) -> list[str]:
    """'name: was X, now Y' for each setting a resumed run changes (none for a state saved before settings were)."""
    if not isinstance(saved, dict):
        return []
    return [f"{k}: was {saved.get(k)!r}, now {v!r}" for k, v in now.items() if k in saved and saved[k] != v]


def _save_state(path: Path, model: ECANFNet, optimizer: torch.optim.Optimizer, ema, scaler, epoch: int,
                best: float, history: list[dict[str, float]], settings: dict[str, Any]) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "best": best,
             "history": history, "ema": ema.state_dict() if ema is not None else {},
             "scaler": scaler.state_dict(), "settings": settings}
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def _load_state(path: Path, model: ECANFNet, optimizer: torch.optim.Optimizer, ema,
                scaler, settings: dict[str, Any] | None) -> tuple[int, float, list]:
    """Restore a run from its training state; TrainingError (one line naming the file) for anything unusable,
    or for a resume whose settings differ from the run's (each one named; settings None: not checked)."""
    state = _read_state(path)
    _check_state_model(path, state["model"], model)  # first: another class count is the more telling refusal
    changed = _changed_settings(state.get("settings"), settings) if settings is not None else []
    if changed:
        raise TrainingError(f"{path}: this run was started with other settings ({'; '.join(changed)}); resume "
                            "with the same ones, start a new run (--overwrite, or another --output), or pass "
                            "--resume-with-changes to apply them from the next epoch")
    if ema is not None and not state.get("ema"):
        raise TrainingError(f"{path}: this run was started without --ema-decay; resume it without it too")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        epoch, best, history = int(state["epoch"]), float(state["best"]), list(state["history"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise TrainingError(f"{path}: its optimizer / EMA state does not fit this run (other --freeze-backbone "
                            f"or --ema-decay settings?): {torch_error_line(exc)}") from None
    if epoch < 0 or not all(isinstance(row, dict) for row in history):
        raise TrainingError(f"{path}: not an ecanfnet training state (epoch {epoch}, history of {len(history)} rows)")
    return epoch, best, history


def _read_state(path: Path) -> dict[str, Any]:
    """The dict in a training state file, loaded without running any pickled code (weights_only)."""
    try:
        state = safe_torch_load(path)
    except TorchLoadError as exc:  # truncated zip, random bytes, refused pickle: all mean "unreadable"
        raise TrainingError(f"{path}: not a readable training state (damaged, or not written by ecanfnet train; "
                            f"nothing in it was run): {exc.reason}") from None
    if not isinstance(state, dict) or any(key not in state for key in STATE_KEYS):
        found = sorted(map(str, state))[:5] if isinstance(state, dict) else type(state).__name__
        raise TrainingError(f"{path}: not an ecanfnet training state (expected the keys {', '.join(STATE_KEYS)}; "
                            f"found {found})")
    if not isinstance(state["model"], dict) or not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise TrainingError(f"{path}: not an ecanfnet training state ('model' is not a dict of tensors)")
    return state


def _check_state_model(path: Path, saved: dict[str, torch.Tensor], model: ECANFNet) -> None:
    """The saved weights must be this model's, with this run's number of classes."""
    own = model.state_dict()
    head = saved.get("head.fc.weight")
    if head is not None and head.ndim == 2 and head.shape[0] != model.num_classes:
        raise TrainingError(f"{path}: holds a training state for {head.shape[0]} classes, this run has "
                            f"{model.num_classes} (class folders of --data changed?); use --overwrite to start over")
    missing, unexpected = sorted(own.keys() - saved.keys()), sorted(map(str, saved.keys() - own.keys()))
    if missing or unexpected:  # repr: a hostile key may hold newlines or terminal escapes
        raise TrainingError(f"{path}: not a training state of {model.name} ({len(missing)} of its tensors missing, "
                            f"{len(unexpected)} unknown ones, e.g. {(missing + unexpected)[0]!r})")
    for key, tensor in own.items():
        if saved[key].shape != tensor.shape:
            raise TrainingError(f"{path}: tensor {key} has shape {tuple(saved[key].shape)}, "
                                f"this model's is {tuple(tensor.shape)}")


def _plot_curves(out: Path, history: list[dict[str, float]]) -> None:
    """OUT/curves.png: train/val loss and val top-1/top-5 by epoch (skipped without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train loss")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="val loss")
    ax_acc.plot(epochs, [r["val_top1"] for r in history], "o-", label="val top-1")
    ax_acc.plot(epochs, [r["val_top5"] for r in history], "o-", label="val top-5")
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    write_atomically(out / "curves.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


