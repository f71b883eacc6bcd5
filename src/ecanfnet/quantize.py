"""INT8 models: post-training quantization of the folded trunk with NNCF, its accuracy report, and the INT8 folder.

An INT8 model folder, written by :func:`quantize_folder` (``ecanfnet quantize``) and accepted as weights by
predict, evaluate, embed, serve, search and bench:
  ``config.json``        the source checkpoint's metadata (architecture, preprocessing, labels) and a
                         ``quantization`` section (format, checksum of the trunk, versions);
  ``trunk.xml/.bin``     OpenVINO IR of the INT8 trunk: images (B, 3, H, W) -> pooled features (B, D);
  ``head.safetensors``   the fp32 linear classifier (2304 x C: too small to gain from INT8), appended to the
                         OpenVINO model when it runs (QuantizedECANFNet.openvino_model);
  ``quantization.json``  the report: agreement with fp32 on held-out images, validation top-1, settings.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from .backends import ir_sha256, openvino_core
from .choices import DEFAULT_HOLDOUT, DEFAULT_MIN_AGREEMENT, DEFAULT_SAMPLES
from .errors import QuantizeError, QuantizeRefused, WeightsError  # noqa: F401 (QuantizeRefused: re-exported)
from .fileio import write_atomically, write_json_atomically
from .metadata import PretrainedCfg, validate_config

if TYPE_CHECKING:
    import openvino

    from .model import ECANFNet

FORMAT = "openvino-int8"
TRUNK_FILE, HEAD_FILE, REPORT_FILE = "trunk.xml", "head.safetensors", "quantization.json"
# Bounds on what an INT8 folder may make us read: the L0-L2 trunks are 30-70 MB of INT8 IR.
MAX_TRUNK_XML_BYTES = 32 * 2**20
MAX_TRUNK_BIN_BYTES = 512 * 2**20
MAX_NUM_FEATURES = 16384

logger = logging.getLogger("ecanfnet")


class _Shared:
    """A read-only object that copy.deepcopy shares instead of copying (the OpenVINO model)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __deepcopy__(self, memo: dict) -> "_Shared":
        return self


class QuantizedECANFNet(nn.Module):
    """An INT8 ECA-NFNet: the OpenVINO INT8 trunk (images -> pooled features) and an fp32 linear classifier.

    It stands where an ECANFNet does for running (make_runner, Classifier, InferenceEngine, embed): the
    same name, pretrained_cfg, num_classes, num_features and head.fc; calling it runs the trunk on OpenVINO.
    """

    def __init__(self, trunk: openvino.Model, fc: nn.Linear | None, name: str, pretrained_cfg: PretrainedCfg,
                 num_features: int, trunk_sha256: str) -> None:
        super().__init__()
        self.name, self.num_features = name, num_features
        self.head_hidden_size = num_features  # the trunk already pools: its output width is the embedding's
        self.head = nn.Module()
        self.head.fc = fc.eval() if fc is not None else nn.Identity()
        self.num_classes = fc.out_features if fc is not None else 0
        same = pretrained_cfg.num_classes == self.num_classes
        self.pretrained_cfg = pretrained_cfg if same else pretrained_cfg.with_classes(self.num_classes)
        self._trunk = _Shared(trunk)
        # In the state dict, so that weights_fingerprint (embedding manifests, search) covers the trunk too.
        self.register_buffer("trunk_digest", torch.tensor(list(bytes.fromhex(trunk_sha256)), dtype=torch.uint8))
        self._runner = None

    @property
    def openvino_trunk(self) -> openvino.Model:
        """The INT8 trunk as an OpenVINO model (what make_runner compiles)."""
        return self._trunk.value

    def openvino_model(self) -> openvino.Model:
        """What make_runner compiles: the trunk, followed by the fp32 classifier (MatMul + Add) when there is one.

        In OpenVINO rather than torch: one call a batch, and no torch thread pool spinning beside OpenVINO's
        (measured 2-3 % faster at batch 1 and 8).
        """
        fc = self.head.fc
        if not isinstance(fc, nn.Linear):
            return self.openvino_trunk
        import openvino as ov
        import openvino.opset13 as ops

        features = self.openvino_trunk.get_results()[0].input_value(0)
        weight, bias = fc.weight.detach().float().numpy(), fc.bias.detach().float().numpy()
        logits = ops.add(ops.matmul(features, ops.constant(weight), False, True), ops.constant(bias))
        logits.output(0).get_tensor().set_names({"logits"})
        return ov.Model([logits.output(0)], self.openvino_trunk.get_parameters(), "ecanfnet-int8")

    def reset_classifier(self, num_classes: int) -> None:
        """Drop the classifier (num_classes=0: the model outputs pooled features); an INT8 model gets no new one."""
        if num_classes != 0:
            raise WeightsError("an INT8 model's classifier cannot be replaced; fine-tune the fp32 checkpoint "
                               "and quantize the result")
        self.num_classes = 0
        self.pretrained_cfg = self.pretrained_cfg.with_classes(0)
        self.head = nn.Module()  # a new one: an embedding_view shares the old head with the full model
        self.head.fc = nn.Identity()
        self._runner = None  # one built before ran the classifier too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (or pooled features once the classifier is dropped) for a preprocessed float batch."""
        from .backends import make_runner

        if self._runner is None:
            self._runner = make_runner(self)
        return self._runner(x)


# ---------------------------------------------------------------- reading an INT8 folder

def is_int8_folder(path: str | os.PathLike) -> bool:
    """Whether path is a folder holding an INT8 model (its trunk file is there)."""
    return Path(path).is_dir() and (Path(path) / TRUNK_FILE).is_file()


def load_int8_folder(folder: str | os.PathLike) -> QuantizedECANFNet:
    """Read and check an INT8 model folder (every error names the file and the reason)."""
    folder = Path(folder)
    config = _read_int8_config(folder / "config.json")
    xml, bin_ = folder / TRUNK_FILE, folder / TRUNK_FILE.replace(".xml", ".bin")
    _check_file_size(xml, MAX_TRUNK_XML_BYTES)
    _check_file_size(bin_, MAX_TRUNK_BIN_BYTES)
    digest = ir_sha256(xml)
    if digest != config["quantization"]["trunk_sha256"]:
        raise WeightsError(f"{xml}: the INT8 trunk does not match the checksum in {folder / 'config.json'} "
                           "(damaged or replaced); quantize again")
    fc = _read_head(folder / HEAD_FILE, config)
    try:
        trunk = openvino_core().read_model(str(xml))
    except (RuntimeError, ValueError) as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise WeightsError(f"{xml}: OpenVINO cannot read this model ({lines[-1].strip() if lines else exc})") from None
    _check_trunk_shapes(trunk, config["num_features"], xml)
    meta = PretrainedCfg.from_validated(config, str(folder / "config.json"))
    return QuantizedECANFNet(trunk, fc, config["architecture"], meta, config["num_features"], digest)


def _check_file_size(path: Path, limit: int) -> None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise WeightsError(f"{path}: {exc.strerror or exc} (an INT8 model folder needs it)") from None
    if not path.is_file():
        raise WeightsError(f"{path}: not a regular file")
    if size == 0 or size > limit:
        raise WeightsError(f"{path}: {size} bytes; an INT8 trunk file holds 1 to {limit} bytes")


def _read_int8_config(path: Path) -> dict[str, Any]:
    """config.json of an INT8 folder: the checkpoint metadata (validate_config) and a checked quantization section."""
    from .weights import read_config_file  # the size-bounded reading every config.json gets

    if not path.is_file():
        raise WeightsError(f"{path}: missing (an INT8 model folder needs it)")
    raw = read_config_file(path)
    section = raw.get("quantization")
    if not isinstance(section, dict) or section.get("format") != FORMAT:
        raise WeightsError(f"{path}: \"quantization.format\" must be {FORMAT!r} in an INT8 model folder")
    digest = section.get("trunk_sha256")
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise WeightsError(f"{path}: \"quantization.trunk_sha256\" must be 64 lowercase hex digits")
    width = raw.get("num_features")
    if type(width) is not int or not 1 <= width <= MAX_NUM_FEATURES:
        raise WeightsError(f"{path}: \"num_features\" must be an integer from 1 to {MAX_NUM_FEATURES}")
    config = validate_config(raw, str(path))
    if not config.get("architecture") or not config.get("num_classes"):
        raise WeightsError(f"{path}: \"architecture\" and a positive \"num_classes\" are needed in an INT8 model folder")
    config.update(quantization={"trunk_sha256": digest}, num_features=width)
    return config


def _read_head(path: Path, config: dict[str, Any]) -> nn.Linear:
    """The fp32 classifier of an INT8 folder: exactly head.fc.weight (C, D) and head.fc.bias (C), finite."""
    from .weights import _read_weights_file

    state = _read_weights_file(path)
    weight, bias = state.get("head.fc.weight"), state.get("head.fc.bias")
    want = (config.get("num_classes"), config["num_features"])
    if set(state) != {"head.fc.weight", "head.fc.bias"} or weight.ndim != 2 or tuple(weight.shape) != want \
            or tuple(bias.shape) != want[:1]:
        found = ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(state.items())[:4])
        raise WeightsError(f"{path}: expected head.fc.weight {want} and head.fc.bias ({want[0]},) "
                           f"as config.json says; found {found}")
    fc = nn.Linear(want[1], want[0])
    fc.load_state_dict({"weight": weight.float(), "bias": bias.float()})
    return fc


def _check_trunk_shapes(trunk: openvino.Model, width: int, xml: Path) -> None:
    """One input (B, 3, H, W) and one output (B, width): anything else is not an ecanfnet INT8 trunk."""
    import openvino as ov

    if len(trunk.inputs) != 1 or len(trunk.outputs) != 1:
        raise WeightsError(f"{xml}: expected one input and one output, found {len(trunk.inputs)} and {len(trunk.outputs)}")
    shape_in, shape_out = trunk.inputs[0].get_partial_shape(), trunk.outputs[0].get_partial_shape()
    if shape_in.rank.is_dynamic or len(shape_in) != 4 or not shape_in[1].compatible(ov.Dimension(3)):
        raise WeightsError(f"{xml}: the input must be images (B, 3, H, W), found {shape_in}")
    if shape_out.rank.is_dynamic or len(shape_out) != 2 or not shape_out[1].compatible(ov.Dimension(width)):
        raise WeightsError(f"{xml}: the output must be features (B, {width}) as config.json says, found {shape_out}")


# ---------------------------------------------------------------- quantizing

@dataclass
class CalibrationImages:
    """Preprocessed crops (uint8, H x W x 3) split into calibration and held-out sets, and what was skipped."""

    calibration: list[np.ndarray]
    held_out: list[np.ndarray]
    skipped: list[dict[str, str]] = field(default_factory=list)


def read_calibration_images(folder: str | os.PathLike, transform: Any, *, samples: int = DEFAULT_SAMPLES,
                            holdout: int = DEFAULT_HOLDOUT, seed: int = 0, workers: int | None = None,
                            decode: str = "exact", progress: bool = False) -> CalibrationImages:
    """Up to holdout + samples readable images from folder (searched recursively), in a seeded random order.

    A folder with fewer holds out a quarter of them (at least one). Unreadable files are skipped and listed.
    """
    from .files import decoded_batches, walk_image_files
    from .progress import progress as progress_bar

    folder = Path(folder)
    if not folder.is_dir():
        raise QuantizeError(f"{folder}: no such folder (--calibration needs a folder of images)")
    paths = sorted(walk_image_files(folder))
    if not paths:
        raise QuantizeError(f"{folder}: no image files in this folder (searched recursively)")
    random.Random(seed).shuffle(paths)
    want, crops, skipped = samples + holdout, [], []
    with progress_bar(min(want, len(paths)), "calibration images", enabled=progress) as bar:
        for batch in decoded_batches(paths, transform.resize_and_crop, 16, workers, decode=decode):
            for path, image, error in batch:
                if image is None:
                    logger.warning("skipped calibration image %s", error)
                    skipped.append({"path": path, "error": error})
                elif len(crops) < want:
                    crops.append(np.asarray(image, dtype=np.uint8))
                    bar.update(1)
            if len(crops) >= want:
                break
    if len(crops) < 2:
        raise QuantizeError(f"{folder}: {len(crops)} readable image(s); quantization needs at least 2 "
                            f"(some to calibrate on, some held out to measure the result)")
    held = holdout if len(crops) >= want else min(holdout, max(1, len(crops) // 4))
    return CalibrationImages(crops[held:held + samples], crops[:held], skipped)


def convert_trunk(model: ECANFNet) -> openvino.Model:
    """The folded fp32 trunk (images -> pooled features) of model as an OpenVINO model."""
    from .backends import convert_openvino
    from .model import embedding_view

    return convert_openvino(embedding_view(model))


def quantize_trunk(model: ECANFNet, calibration: list[np.ndarray], to_input: Callable[[np.ndarray], np.ndarray], *,
                   validation: list[tuple[np.ndarray, int]] | None = None, max_drop: float | None = None,
                   progress: bool = False) -> openvino.Model:
    """NNCF post-training INT8 quantization of model's trunk, calibrated on the given crops.

    Two choices beyond NNCF's defaults, measured on the digits model (docs/benchmarks.md#int8-accuracy):
    the first convolution (3 input channels, ~0.3 % of the compute) stays in float, and activations are
    quantized asymmetrically (the MIXED preset; SiLU outputs are mostly positive). Held-out top-1 drop
    1.11 -> -0.28 points, at 2-3 % of INT8 speed.
    With validation (crop, label) pairs and max_drop (top-1 points), NNCF's accuracy-controlled
    quantization keeps the layers that cost most accuracy in float until the drop is within max_drop.
    """
    import contextlib
    import sys

    nncf = _import_nncf()
    openvino_core()  # the process's Core first: NNCF's own come and go inside its lifetime (see openvino_core)
    trunk = convert_trunk(model)
    data = nncf.Dataset(calibration, lambda crop: to_input(crop))
    first_conv = next(op for op in trunk.get_ordered_ops() if op.get_type_name() == "Convolution")
    settings = {"subset_size": len(calibration), "preset": nncf.QuantizationPreset.MIXED,
                "ignored_scope": nncf.IgnoredScope(names=[first_conv.get_friendly_name()])}
    # NNCF draws its progress bars on stdout, which belongs to the command's report.
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(sys.stderr if progress else stack.enter_context(
            open(os.devnull, "w"))))
        if validation is None or max_drop is None:
            return nncf.quantize(trunk, data, **settings)
        fc = model.head.fc
        weight, bias = fc.weight.detach().float().numpy(), fc.bias.detach().float().numpy()

        def top1(compiled, items: Iterable[tuple[np.ndarray, int]]) -> float:
            items = list(items)
            hits = sum(int(np.argmax(compiled(to_input(crop))[0] @ weight.T + bias) == label) for crop, label in items)
            return hits / max(1, len(items))
        return nncf.quantize_with_accuracy_control(
            trunk, data, nncf.Dataset(validation), validation_fn=top1, max_drop=max_drop / 100,
            drop_type=nncf.DropType.ABSOLUTE, **settings)


def _import_nncf():
    """nncf, quiet (its INFO lines and torch's CUDA notice are not the user's business here)."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        import nncf
    except ImportError:
        raise QuantizeError("INT8 quantization needs nncf and openvino: pip install 'ecanfnet[openvino]'") from None
    nncf.set_log_level(logging.WARNING)
    return nncf


def compare_logits(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """How other's logits agree with reference's, row by row: top-1 / top-5 agreement and the logit error.

    top5_agreement: the share of rows whose five highest classes are the same set (in any order).
    """
    k = min(5, reference.shape[1])
    same_top5 = (reference.topk(k).indices.sort().values == other.topk(k).indices.sort().values).all(dim=1)
    diff = (reference - other).abs()
    return {"images": int(reference.shape[0]),
            "top1_agreement": float((reference.argmax(1) == other.argmax(1)).float().mean()),
            "top5_agreement": float(same_top5.float().mean()),
            "logit_max_abs_error": float(diff.max()), "logit_mean_abs_error": float(diff.mean()),
            "logit_max_rel_error": float(diff.max() / reference.abs().max().clamp_min(1e-12))}


def _logits(runner: Callable[[torch.Tensor], torch.Tensor], crops: list[np.ndarray],
            to_input: Callable[[np.ndarray], np.ndarray], batch_size: int = 16) -> torch.Tensor:
    return torch.cat([runner(torch.from_numpy(np.concatenate([to_input(c) for c in crops[i:i + batch_size]])))
                      for i in range(0, len(crops), batch_size)])


MAX_VALIDATION_IMAGES = 2000  # --val images used (a seeded sample of larger folders): each is kept as a crop


def quantize_folder(weights: Any, calibration: str | os.PathLike, output: str | os.PathLike, *,
                    samples: int = DEFAULT_SAMPLES, holdout: int = DEFAULT_HOLDOUT, val: str | os.PathLike | None = None,
                    max_drop: float | None = None, min_agreement: float = DEFAULT_MIN_AGREEMENT, force: bool = False,
                    seed: int = 0, workers: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Quantize a checkpoint to INT8 on the user's images and write an INT8 model folder; return the report.

    The report holds top-1/top-5 agreement with fp32 and the logit error on held-out images, and with
    val (a labelled folder, one subfolder per class) the top-1 of both. A model whose top-1 agreement is
    below min_agreement, or whose val top-1 drops by more than max_drop points, is refused
    (QuantizeRefused) unless force is set.
    """
    from .transforms import eval_transform
    from .factory import create_model

    started, output = time.perf_counter(), Path(output)
    check_int8_output(output)
    model = create_model(pretrained=weights)
    transform = eval_transform(model.pretrained_cfg)
    to_input = lambda crop: transform.to_tensor(crop)[None].numpy()  # noqa: E731
    images = read_calibration_images(calibration, transform, samples=samples, holdout=holdout, seed=seed,
                                     workers=workers, progress=progress)
    validation = read_validation_images(val, model, transform, seed, workers) if val is not None else None
    logger.info("quantizing on %d images (%d held out to measure it)", len(images.calibration), len(images.held_out))
    trunk = quantize_trunk(model, images.calibration, to_input,
                           validation=validation[0] if validation else None, max_drop=max_drop, progress=progress)
    int8 = int8_model(model, trunk)
    report = _measure(model, int8, images, validation, to_input)
    report.update(calibration={"folder": str(calibration), "images": len(images.calibration), "seed": seed,
                               "skipped": images.skipped},
                  method="accuracy-control" if validation and max_drop is not None else "default",
                  min_top1_agreement=min_agreement, max_drop_points=max_drop, source=str(weights),
                  seconds=round(time.perf_counter() - started, 1))
    problems = _guard_problems(report, min_agreement, max_drop)
    report.update(accepted=not problems, forced=bool(problems) and force)
    if problems and not force:
        raise QuantizeRefused("; ".join(problems) + f"; {output} not written (--force writes it anyway)", report)
    write_int8_folder(output, trunk, model, report)
    return report


def read_validation_images(folder: str | os.PathLike, model: ECANFNet, transform: Any, seed: int,
                           workers: int | None) -> tuple[list[tuple[np.ndarray, int]], list[dict[str, str]]]:
    """(crop, label) pairs of a labelled folder (class subfolders matched to the checkpoint's classes), and the skipped."""
    from .files import decoded_batches
    from .training.data import scan_image_folder
    from .evaluate import map_class_folders

    try:
        folders, samples = scan_image_folder(folder)
        mapping = map_class_folders(folders, model.pretrained_cfg)
    except (FileNotFoundError, ValueError) as exc:
        raise QuantizeError(f"--val: {exc}") from None
    if len(samples) > MAX_VALIDATION_IMAGES:
        samples = random.Random(seed).sample(samples, MAX_VALIDATION_IMAGES)
    labels = dict(samples)
    pairs, skipped = [], []
    for batch in decoded_batches([p for p, _ in samples], transform.resize_and_crop, 16, workers):
        for path, image, error in batch:
            if image is None:
                logger.warning("skipped validation image %s", error)
                skipped.append({"path": path, "error": error})
            else:
                pairs.append((np.asarray(image, dtype=np.uint8), mapping[labels[path]]))
    if not pairs:
        raise QuantizeError(f"{folder}: no readable images in the class subfolders (--val)")
    return pairs, skipped


def int8_model(model: ECANFNet, trunk: openvino.Model) -> QuantizedECANFNet:
    """An in-memory INT8 model from an INT8 trunk and model's own classifier and metadata."""
    import copy

    from .weights import weights_fingerprint

    # Not yet written, so no file checksum: its source's fingerprint stands for it (written folders have their own).
    digest = hashlib.sha256(f"int8 of {weights_fingerprint(model)}".encode()).hexdigest()
    fc = copy.deepcopy(model.head.fc).float().cpu() if model.num_classes else None
    return QuantizedECANFNet(trunk, fc, model.name, model.pretrained_cfg, model.head_hidden_size, digest)


def _measure(model: ECANFNet, int8: QuantizedECANFNet, images: CalibrationImages,
             validation: tuple[list[tuple[np.ndarray, int]], list[dict[str, str]]] | None,
             to_input: Callable[[np.ndarray], np.ndarray]) -> dict[str, Any]:
    """Agreement of int8 with fp32 on the held-out crops; top-1 of both on the validation pairs."""
    from .backends import make_runner

    fp32_runner, int8_runner = make_runner(model, "auto", "fp32", "cpu"), make_runner(int8)
    report: dict[str, Any] = {"held_out": compare_logits(_logits(fp32_runner, images.held_out, to_input),
                                                         _logits(int8_runner, images.held_out, to_input))}
    if validation is not None:
        pairs, skipped = validation
        labels = torch.tensor([label for _, label in pairs])
        crops = [crop for crop, _ in pairs]
        top1 = {name: float((_logits(r, crops, to_input).argmax(1) == labels).float().mean())
                for name, r in (("fp32", fp32_runner), ("int8", int8_runner))}
        report["validation"] = {"images": len(pairs), "top1_fp32": top1["fp32"], "top1_int8": top1["int8"],
                                "drop_points": round(100 * (top1["fp32"] - top1["int8"]), 2), "skipped": skipped}
    return report


def _guard_problems(report: dict[str, Any], min_agreement: float, max_drop: float | None) -> list[str]:
    """Why the accuracy guard refuses this INT8 model (empty: accepted)."""
    problems = []
    agreement = report["held_out"]["top1_agreement"]
    if agreement < min_agreement:
        problems.append(f"top-1 agreement with fp32 on {report['held_out']['images']} held-out images is "
                        f"{100 * agreement:.1f}%, below the {100 * min_agreement:.1f}% required (--min-agreement)")
    drop = report.get("validation", {}).get("drop_points")
    if max_drop is not None and drop is not None and drop > max_drop:
        problems.append(f"validation top-1 drops {drop:.2f} points, more than --max-drop {max_drop:g}")
    return problems


def check_int8_output(output: Path) -> None:
    """Refuse (QuantizeError/OSError) an output that cannot be written or holds something other than an INT8 folder."""
    from .fileio import check_output_dir

    if output.is_dir() and any(output.iterdir()) and not is_int8_folder(output):
        raise QuantizeError(f"{output}: exists and is not an INT8 model folder written by `ecanfnet quantize`; "
                            "not replacing it: choose another --output")
    check_output_dir(output)


def write_int8_folder(output: Path, trunk: openvino.Model, model: ECANFNet, report: dict[str, Any]) -> Path:
    """Write the INT8 model folder complete in a staging folder beside output, then move it into place."""
    import nncf
    import openvino as ov
    from safetensors.torch import save_file

    from .backends import save_openvino
    from .weights import weights_fingerprint
    from .fileio import move_folder_into_place, new_dir_mode

    check_int8_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.int8-"))
    try:
        save_openvino(trunk, staging / TRUNK_FILE)
        fc = model.head.fc
        head = {"head.fc.weight": fc.weight.detach().float().contiguous(),
                "head.fc.bias": fc.bias.detach().float().contiguous()}
        write_atomically(staging / HEAD_FILE, lambda tmp: save_file(head, tmp))
        config = model.pretrained_cfg.to_config(architecture=model.name, num_features=model.head_hidden_size,
                                                global_pool=model.global_pool)
        config["quantization"] = {"format": FORMAT, "trunk_sha256": ir_sha256(staging / TRUNK_FILE),
                                  "source": report.get("source"), "source_fingerprint": weights_fingerprint(model),
                                  "openvino": ov.get_version(), "nncf": nncf.__version__}
        write_json_atomically(staging / "config.json", config)
        write_json_atomically(staging / REPORT_FILE, report)
        os.chmod(staging, new_dir_mode())
        move_folder_into_place(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def quantize_on_random_input(model: ECANFNet, image_size: int | tuple[int, int], count: int = 16,
                             seed: int = 0) -> QuantizedECANFNet:
    """An INT8 model calibrated on random images (count of them): for timing only, its accuracy means nothing."""
    from .transforms import height_width

    height, width = height_width(image_size)
    rng = np.random.default_rng(seed)
    inputs = [rng.standard_normal((1, 3, height, width), dtype=np.float32) for _ in range(count)]
    return int8_model(model, quantize_trunk(model, inputs, lambda x: x))
