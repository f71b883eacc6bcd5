"""The state of a training run (TrainState): model, optimizer, gradient scaler and weight EMA, where the process
runs, how far the run got; saved to OUT.training/last.pt after every epoch and checked when a run resumes.

The layout of a run: OUT holds only what is published (README.md, config.json, model.safetensors); the training
state and byproducts (last.pt, metrics.csv, curves.png, tensorboard/) live beside it in OUT.training, which uploading OUT (`hf
upload OUT`, `ecanfnet push OUT`) never includes. Versions up to 0.1 kept them inside OUT (training/last.pt,
metrics.csv, curves.png): a resume moves them over (adopt_legacy_run), --overwrite removes them.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..distributed import DistContext, restart_attempt
from ..errors import TrainingError
from ..fileio import check_output_dir, write_atomically
from ..model import ECANFNet
from ..publish import PUBLISH_FILES
from ..weights import TorchLoadError, safe_torch_load, torch_error_line
from .config import TrainConfig, changed_settings, run_settings

if TYPE_CHECKING:
    from torch.optim.swa_utils import AveragedModel

log = logging.getLogger("ecanfnet")

TRAINING_SUFFIX = ".training"               # OUT.training: the run's state and byproducts, beside OUT
STATE_NAME, METRICS_NAME, CURVES_NAME = "last.pt", "metrics.csv", "curves.png"
TENSORBOARD_NAME = "tensorboard"            # OUT.training/tensorboard: the run's TensorBoard event files,
EVENTS_PREFIX = "events.out.tfevents."      # each named by this prefix, a timestamp, the host and the pid
# Where versions up to 0.1 kept the state and byproducts: inside OUT (relative to it).
LEGACY_STATE = "training/last.pt"
LEGACY_BYPRODUCTS = (LEGACY_STATE, METRICS_NAME, CURVES_NAME)
STATE_KEYS = ("model", "optimizer", "epoch", "best", "history")


@dataclass
class TrainState:
    """What a run carries from epoch to epoch, and what its state file holds."""

    model: ECANFNet
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler                # fp16: scales the loss against underflow; a no-op otherwise
    ema: AveragedModel | None                   # the weights' exponential moving average (--ema-decay)
    context: DistContext                        # rank, world size and device of this process
    settings: dict[str, Any]                    # the resolved settings that decide the result (run_settings)
    epoch: int = 0                              # epochs finished (so: the index of the epoch in progress)
    best: float = -1.0                          # the best validation top-1 so far
    history: list[dict[str, float]] = field(default_factory=list)  # one metrics row per finished epoch
    reported: set[str] = field(default_factory=set)  # unreadable-image reasons already logged

    @classmethod
    def start(cls, model: ECANFNet, cfg: TrainConfig, context: DistContext) -> TrainState:
        """The state before the first epoch of a resolved cfg: model on the context's device, fresh optimizer etc."""
        scaler = grad_scaler(cfg.precision, context.device)
        model.to(context.device)
        return cls(model, build_optimizer(model, cfg), scaler, weight_ema(model, cfg.ema_decay), context,
                   run_settings(cfg, context.world))

    @property
    def device(self) -> torch.device:
        """Where this process trains."""
        return self.context.device

    @property
    def final_model(self) -> torch.nn.Module:
        """The weights that are validated and exported: the EMA's when there is one, else the model's."""
        return self.ema.module if self.ema is not None else self.model

    def save(self, path: Path) -> None:
        """Write the state file atomically."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                 "best": self.best, "history": self.history,
                 "ema": self.ema.state_dict() if self.ema is not None else {},
                 "scaler": self.scaler.state_dict(), "settings": self.settings}
        write_atomically(path, lambda tmp: torch.save(state, tmp))

    def resume(self, path: Path, *, check_settings: bool = True) -> None:
        """Restore the run saved in path; TrainingError (one line naming the file) for anything unusable, or for
        settings that differ from the run's (each one named; not checked when check_settings is False)."""
        state = read_state(path)
        _check_state_model(path, state["model"], self.model)  # first: another class count is the more telling refusal
        changed = changed_settings(state.get("settings"), self.settings) if check_settings else []
        if changed:
            raise TrainingError(f"{path}: this run was started with other settings ({'; '.join(changed)}); resume "
                                "with the same ones, start a new run (--overwrite, or another --output), or pass "
                                "--resume-with-changes to apply them from the next epoch")
        if self.ema is not None and not state.get("ema"):
            raise TrainingError(f"{path}: this run was started without --ema-decay; resume it without it too")
        try:
            self._load(state)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise TrainingError(f"{path}: its optimizer / EMA state does not fit this run (other --freeze-backbone "
                                f"or --ema-decay settings?): {torch_error_line(exc)}") from None
        if self.epoch < 0 or not all(isinstance(row, dict) for row in self.history):
            raise TrainingError(f"{path}: not an ecanfnet training state (epoch {self.epoch}, history of "
                                f"{len(self.history)} rows)")

    def _load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.best, self.history = int(state["epoch"]), float(state["best"]), list(state["history"])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """fp16: gradients scaled against underflow and unscaled before AGC; a no-op scaler otherwise."""
    if precision == "fp16" and device.type != "cuda":
        warnings.warn("fp16 training on CPU is emulated and slow (it exists to check the fp16 path); "
                      "use --precision bf16 or fp32 on CPU", stacklevel=2)
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def build_optimizer(model: ECANFNet, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum over the trained parameters; no weight decay on gains and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith((".gain", ".bias")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, nesterov=True)


def weight_ema(model: ECANFNet, decay: float) -> AveragedModel | None:
    """An exponential moving average of the weights (torch's AveragedModel), or None when decay is 0."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))


def training_dir(out: str | os.PathLike) -> Path:
    """OUT.training, beside OUT: where a run keeps its state and byproducts, apart from the files to publish."""
    out = Path(out)
    if out.name in ("", ".", ".."):  # ".", "..", "runs/..": name the folder itself
        out = Path(os.path.abspath(out))
    if not out.name:
        raise TrainingError(f"{out}: name a folder for the model, not the root of the file system")
    return out.with_name(out.name + TRAINING_SUFFIX)


def state_file(out: str | os.PathLike) -> Path:
    """The training state of the run in OUT: OUT.training/last.pt."""
    return training_dir(out) / STATE_NAME


def check_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse, before any work, an OUT (or OUT.training) that is a file, cannot be created, or holds a run that
    would be replaced."""
    if resume and overwrite:
        raise TrainingError("--resume and --overwrite contradict each other: continue OUT, or replace it")
    for folder in (out, training_dir(out)):
        try:
            check_output_dir(folder)
        except NotADirectoryError as exc:
            raise TrainingError(f"{folder}: {exc.strerror}; name a folder for the model") from None
        except OSError as exc:  # the nearest existing folder refuses new files (permissions, /proc, read-only mount)
            raise TrainingError(f"{folder}: {exc.strerror}") from None
    held = _run_files(out)
    restarted = restart_attempt() > 0  # by torchrun: OUT holds this very run's last saved epoch
    if held and not (resume or overwrite or restarted):
        raise TrainingError(f"{out}: already holds a model, model card or training state ({', '.join(held)}); "
                            f"pass --resume to continue that run, or --overwrite to replace it")
    if held and resume and not restarted and not (state_file(out).exists() or (out / LEGACY_STATE).exists()):
        raise TrainingError(f"{out}: holds a model ({', '.join(held)}) but no training state "
                            f"({state_file(out)}) to resume; pass --overwrite to replace it with a new run")


def _run_files(out: Path) -> list[str]:
    """The files of an earlier run found in OUT (by name) and OUT.training (by path)."""
    inside = [name for name in (*PUBLISH_FILES, *LEGACY_BYPRODUCTS) if (out / name).exists()]
    beside = [str(training_dir(out) / name) for name in (STATE_NAME, METRICS_NAME)
              if (training_dir(out) / name).exists()]
    return inside + beside


def adopt_legacy_run(out: Path) -> None:
    """Move the state and byproducts an earlier version left inside OUT to OUT.training, where a resume reads them
    (only when OUT.training holds no state of its own)."""
    legacy, target = out / LEGACY_STATE, training_dir(out)
    if not legacy.is_file() or (target / STATE_NAME).exists():
        return
    target.mkdir(parents=True, exist_ok=True)
    for name in LEGACY_BYPRODUCTS:
        if (out / name).is_file():
            shutil.move(out / name, target / Path(name).name)  # a rename, or a copy across file systems
    _remove_empty_folder(legacy.parent)
    log.info("moved the training state of an earlier version from %s to %s (OUT now holds only the files to "
             "publish)", legacy, target / STATE_NAME)


def forget_previous_run(out: Path) -> None:
    """--overwrite: remove the training state (so that a restart never resumes the replaced run), its TensorBoard
    events (the new run's would be shown mixed with them), the published files (so that a run stopped before its
    first save leaves no earlier model to push) and the byproducts an earlier version left inside OUT."""
    state_file(out).unlink(missing_ok=True)
    for events in (training_dir(out) / TENSORBOARD_NAME).glob(EVENTS_PREFIX + "*"):
        events.unlink(missing_ok=True)
    for name in (*PUBLISH_FILES, *LEGACY_BYPRODUCTS):
        (out / name).unlink(missing_ok=True)
    _remove_empty_folder(out / Path(LEGACY_STATE).parent)


def _remove_empty_folder(folder: Path) -> None:
    """Remove folder if it exists and is empty; leave it otherwise."""
    try:
        folder.rmdir()
    except OSError:  # missing, not empty, or not ours to remove
        pass


def read_state(path: Path) -> dict[str, Any]:
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
