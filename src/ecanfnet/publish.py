"""Publishing a trained model: the model card (README.md) that `ecanfnet train` writes into its output folder,
and `push`, which uploads exactly the publishable files of such a folder to the Hugging Face Hub.

A publishable folder holds README.md, config.json and model.safetensors, nothing else that matters: the training
state and byproducts live beside it (OUT.training, see training/state.py). huggingface_hub is imported only when
pushing.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .choices import HUB_PREFIXES
from .console import printable
from .errors import PublishError  # noqa: F401 (re-exported: callers catch it from here)
from .fileio import write_text_atomically

log = logging.getLogger("ecanfnet")

PUBLISH_FILES = ("README.md", "config.json", "model.safetensors")  # what a push uploads: these, and only these
PUBLISHED_BASE = "timm/eca_nfnet_l0"                                 # the published ImageNet-1k weights
REPO_PLACEHOLDER = "OWNER/REPO"  # in a card's snippets until push names the repository
_PLACEHOLDER_NOTE = f"> Replace `{REPO_PLACEHOLDER}` with the Hub repository"  # a line push drops
MAX_CARD_BYTES = 1 << 20         # a README.md push reads (to fill in the repository) is at most 1 MiB
MAX_LISTED_CLASSES = 100         # rows of the card's class table; the rest are counted
# A Hub repository id: OWNER/NAME, each of letters, digits, ".", "_", "-" (at most 96), no "--" or "..".
_REPO_PART = r"(?!.*(?:--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
REPO_ID = re.compile(rf"{_REPO_PART}/{_REPO_PART}")


@dataclass(frozen=True)
class RunSummary:
    """What a training run knows that its model card reports, as plain values (see training/card.py)."""

    name: str                                  # the model's name: its output folder's
    base_weights: str | None                   # the weights source the run started from; None: from scratch
    classes: tuple[str, ...]
    train_images: tuple[int, ...]              # per class, in the order of classes
    val_images: tuple[int, ...]
    validation: str                            # where the validation images came from
    image_size: int
    preprocessing: str                         # the test-time preprocessing config.json records
    recipe: tuple[tuple[str, str], ...]        # (setting, value) rows of the resolved settings
    history: tuple[Mapping[str, float], ...]   # one metrics row per finished epoch (epoch, train_loss, val_*)
    epochs: int                                # planned
    architecture: str = "eca_nfnet_l0"

    @property
    def base_repo(self) -> str | None:
        """The Hub repository of the base weights (OWNER/NAME), or None (from scratch, or a local file)."""
        return hub_repo(self.base_weights) if self.base_weights else None

    @property
    def best(self) -> Mapping[str, float] | None:
        """The saved epoch's metrics: the first with the highest validation top-1 (None before any epoch)."""
        return max(self.history, key=lambda row: row["val_top1"]) if self.history else None


def hub_repo(source: str) -> str | None:
    """OWNER/NAME of an hf-hub:OWNER/NAME[@REVISION] weights source; None for any other source."""
    for prefix in HUB_PREFIXES:
        if source.startswith(prefix):
            repo = source[len(prefix):].partition("@")[0]
            return repo if REPO_ID.fullmatch(repo) else None
    return None


def md(text: object) -> str:
    """Text from a file tree or the user (class and folder names) as inert Markdown: controls escaped, no markup."""
    text = printable(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`*_\[\]|~#!])", r"\\\1", text)


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.1f} %"


# --- the model card -------------------------------------------------------------------------------------------

def model_card(run: RunSummary) -> str:
    """The README.md of a trained model: front matter, description, results, data, recipe, usage, limitations."""
    sections = (_front_matter(run), _introduction(run), _results(run), _training_data(run), _procedure(run),
                _usage(run), _limitations(run))
    return "\n\n".join(sections) + "\n"


def write_model_card(folder: str | os.PathLike, run: RunSummary) -> Path:
    """Write folder/README.md for run, atomically."""
    text = model_card(run)
    return write_text_atomically(Path(folder) / "README.md", text)


def _front_matter(run: RunSummary) -> str:
    # The published weights' license carries over to models fine-tuned from them; any other start is the owner's call.
    license_line = ["license: apache-2.0"] if run.base_repo == PUBLISHED_BASE else []
    lines = ["---", *license_line, "library_name: timm", "pipeline_tag: image-classification", "tags:",
             "- image-classification", "- timm", "- ecanfnet", f"- {run.architecture}"]
    if run.base_repo:
        lines.append(f"base_model: {run.base_repo}")
    lines += ["metrics:", "- accuracy", "---"]
    return "\n".join(lines)


def _base_description(run: RunSummary) -> str:
    if run.base_weights is None:
        return "trained from scratch (random initialisation, no pretrained weights)"
    if run.base_repo == PUBLISHED_BASE:
        return (f"fine-tuned from [`{PUBLISHED_BASE}`](https://huggingface.co/{PUBLISHED_BASE}), ECA-NFNet-L0 "
                "pretrained on ImageNet-1k")
    if run.base_repo:
        return f"fine-tuned from [`{run.base_repo}`](https://huggingface.co/{run.base_repo})"
    return f"fine-tuned from the local checkpoint `{md(Path(run.base_weights).name)}`"


def _introduction(run: RunSummary) -> str:
    best, total = run.best, sum(run.train_images)
    saved = (f"The weights are those of epoch {int(best['epoch'])} of {run.epochs}, the one with the best "
             "validation top-1 accuracy" if best else "No epoch has finished yet")
    done = len(run.history)
    status = "" if done >= run.epochs else f" Training is in progress: {done} of {run.epochs} epochs finished."
    return (f"# {md(run.name)}\n\n"
            f"An image classifier for {len(run.classes)} classes, {_base_description(run)}. Architecture "
            f"`{run.architecture}` (ECA-NFNet-L0: a normalization-free ResNet-like network with efficient channel "
            f"attention), trained with `ecanfnet` on {total} images at "
            f"{run.image_size}x{run.image_size}. {saved}.{status}")


def _results(run: RunSummary) -> str:
    if not run.history:
        return "## Results\n\nNo epoch has finished yet."
    rows = [("saved weights (best top-1)", run.best), ("last epoch", run.history[-1])]
    lines = ["## Results", "",
             f"Measured on {sum(run.val_images)} validation images: {md(run.validation)}.", "",
             "| | epoch | top-1 | top-5 | loss |", "|---|---|---|---|---|"]
    lines += [f"| {what} | {int(r['epoch'])} | {_percent(r['val_top1'])} | {_percent(r['val_top5'])} | "
              f"{r['val_loss']:.4f} |" for what, r in rows]
    if len(run.classes) <= 5:
        lines += ["", f"With {len(run.classes)} classes top-5 is always 100 %; top-1 is the measure that counts."]
    return "\n".join(lines)


def _training_data(run: RunSummary) -> str:
    lines = ["## Training data", "",
             f"{sum(run.train_images)} training and {sum(run.val_images)} validation images in "
             f"{len(run.classes)} classes, at {run.image_size}x{run.image_size}; validation: {md(run.validation)}.",
             "", "| class | training images | validation images |", "|---|---|---|"]
    shown = zip(run.classes[:MAX_LISTED_CLASSES], run.train_images, run.val_images)
    lines += [f"| {md(name)} | {n_train} | {n_val} |" for name, n_train, n_val in shown]
    if len(run.classes) > MAX_LISTED_CLASSES:
        rest = len(run.classes) - MAX_LISTED_CLASSES
        lines.append(f"| ... and {rest} more | {sum(run.train_images[MAX_LISTED_CLASSES:])} | "
                     f"{sum(run.val_images[MAX_LISTED_CLASSES:])} |")
    lines += ["", "The class names, in the classifier's order, are `label_names` in `config.json`."]
    return "\n".join(lines)


def _procedure(run: RunSummary) -> str:
    start = ("none (random initialisation)" if run.base_weights is None
             else _base_description(run).removeprefix("fine-tuned from "))
    lines = ["## Training procedure", "", f"Starting weights: {start}.", "",
             "| setting | value |", "|---|---|"]
    lines += [f"| {setting} | {value} |" for setting, value in run.recipe]  # numbers and fixed words only
    lines += ["", f"Test-time preprocessing, recorded in `config.json`: {run.preprocessing}."]
    return "\n".join(lines)


def _usage(run: RunSummary) -> str:
    k, repo = min(5, len(run.classes)), REPO_PLACEHOLDER
    return f"""## How to use

{_PLACEHOLDER_NOTE} this folder is uploaded to (`ecanfnet push` fills it in).

`config.json` carries the class names and the preprocessing; each of these loaders applies them.

With `ecanfnet`:

```bash
ecanfnet predict --weights hf-hub:{repo} photo.jpg
```

```python
import ecanfnet

model = ecanfnet.create_model(pretrained="hf-hub:{repo}")
classifier = ecanfnet.Classifier(model)
for result in classifier.predict_files(["photo.jpg"], top_k={k}):
    print(result.to_dict())
```

With [timm](https://github.com/huggingface/pytorch-image-models):

```python
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

model = timm.create_model("hf-hub:{repo}", pretrained=True).eval()
transform = create_transform(**resolve_data_config({{}}, model=model))
with torch.no_grad():
    probs = model(transform(Image.open("photo.jpg").convert("RGB")).unsqueeze(0)).softmax(-1)[0]
labels = model.pretrained_cfg["label_names"]
print([(labels[i], round(float(p), 4)) for p, i in zip(*probs.topk({k}))])
```

With [transformers](https://huggingface.co/docs/transformers) (and timm installed), through its timm wrapper:

```python
from transformers import pipeline

classifier = pipeline("image-classification", model="{repo}")
print(classifier("photo.jpg", top_k={k}))
```"""


def _limitations(run: RunSummary) -> str:
    n_train, n_val = sum(run.train_images), sum(run.val_images)
    fewest = min(run.train_images) if run.train_images else 0
    small = n_train < 10_000 or fewest < 100
    lines = ["## Limitations", "", *_base_limitations(run),
             f"- **A closed set of classes.** Every image gets one of the {len(run.classes)} classes above, with no "
             "\"none of these\" answer, however unrelated the image.",
             f"- **{'A small' if small else 'The'} training set.** {n_train} training images ({fewest} in the "
             f"smallest class) and {n_val} validation images: each validation image moves top-1 by "
             f"{100 / max(1, n_val):.3g} points{', so the results above are rough estimates' if small else ''}. The "
             "model knows only the variety in these images (backgrounds, lighting, cameras) and may rely on cues "
             "that merely happen to go with a class in them.",
             "- **Preprocessing.** The results hold for the preprocessing recorded in `config.json` (see above), "
             "which the loaders above apply; other preprocessing gives other results.",
             "", "Measure accuracy on held-out images from the setting where the model will be used before relying "
             "on it."]
    return "\n".join(lines)


def _base_limitations(run: RunSummary) -> list[str]:
    """The bullets about what the model inherits from its starting weights."""
    if run.base_weights is None:
        return ["- **No pretraining.** Trained from random initialisation on the images listed above only, so it has "
                "none of the general visual features a pretrained backbone brings; expect it to generalise less."]
    if run.base_repo != PUBLISHED_BASE:
        base = _base_description(run).removeprefix("fine-tuned from ")
        return [f"- **The starting weights.** It inherits the limitations of {base}; see that model's card."]
    return [
        "- **What the backbone learned from.** Its features come from ImageNet-1k pretraining: photographs that "
        "mostly show one clearly visible object, a large share of them taken in the United States (about 45 %) and "
        "the United Kingdom (about 8 %). Expect weaker results on drawings, diagrams, scenes with several objects, "
        "and places and settings that collection underrepresents.",
        "- **Bias.** Models pretrained on ImageNet have been found to carry racial and gender biases present in its "
        "images. Nothing here was evaluated for decisions about people; do not use it for them.",
    ]


def card_for_repo(text: str, repo_id: str) -> str:
    """A card with its snippets naming repo_id instead of the placeholder, and without the note about it."""
    if not REPO_ID.fullmatch(repo_id):
        raise PublishError(f"{repo_id!r} is not a Hub repository id (OWNER/NAME)")
    kept, after_note = [], False
    for line in text.splitlines(keepends=True):
        if not (line.startswith(_PLACEHOLDER_NOTE) or (after_note and not line.strip())):
            kept.append(line)
        after_note = line.startswith(_PLACEHOLDER_NOTE)
    return "".join(kept).replace(REPO_PLACEHOLDER, repo_id)


# --- push -----------------------------------------------------------------------------------------------------

DEFAULT_COMMIT_MESSAGE = "Upload model, config and model card (ecanfnet push)"


def check_publishable(folder: str | os.PathLike) -> Path:
    """folder, when it holds the publishable files and ecanfnet loads its weights strictly; else PublishError
    naming the file (a missing one, or config.json / model.safetensors that is no ECA-NFNet timm checkpoint)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"{folder}: no such folder (expected the output folder of ecanfnet train)")
    for name in PUBLISH_FILES:
        if not (folder / name).is_file():
            raise PublishError(f"{folder / name}: missing; a folder to publish holds {', '.join(PUBLISH_FILES)} "
                               f"(ecanfnet train writes them)")
    _check_timm_config(folder / "config.json")
    import torch

    from .errors import WeightsError
    from .model import build_model
    from .weights import load_checkpoint, resolve_weights

    try:
        ckpt = resolve_weights(folder)  # config.json checked, model.safetensors read
        if ckpt.num_classes is None:
            raise PublishError(f"{folder / 'model.safetensors'}: holds no classifier (head.fc); a model to publish "
                               "classifies")
        with torch.device("meta"):  # only the names and shapes are checked: nothing is allocated
            model = build_model(ckpt.architecture, ckpt.num_classes, in_chans=ckpt.in_chans or 3,
                                global_pool=ckpt.global_pool or "avg")
        load_checkpoint(model, ckpt, strict=True)
    except WeightsError as exc:
        raise PublishError(f"cannot publish {folder}: {exc}") from None
    return folder


def _check_timm_config(path: Path) -> None:
    """PublishError unless path is JSON naming the architecture and its pretrained_cfg (what timm and transformers'
    timm wrapper need to load the folder); read as every config.json is (size-bounded, one line for bad JSON)."""
    from .errors import WeightsError
    from .weights import read_config_file

    try:
        config = read_config_file(path)
    except WeightsError as exc:
        raise PublishError(str(exc)) from None
    missing = [key for key in ("architecture", "pretrained_cfg") if key not in config]
    if missing:
        raise PublishError(f"{path}: not a timm hub config (no {', '.join(missing)}); write the folder with "
                           "ecanfnet train or ecanfnet.save_pretrained")


def push(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, token: str | None = None, endpoint: str | None = None) -> str:
    """Upload README.md, config.json and model.safetensors of folder, and nothing else, to the Hub model repository
    repo_id (created if needed) in one commit; returns the commit's URL.

    The card's OWNER/REPO placeholders are filled in with repo_id in the uploaded copy (the folder is left as it
    is). token: None for huggingface_hub's own (HF_TOKEN, or `hf auth login`); endpoint: None for HF_ENDPOINT's."""
    if not REPO_ID.fullmatch(repo_id):
        raise PublishError(f"{repo_id!r} is not a Hub repository id (OWNER/NAME: letters, digits, '.', '_', '-')")
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token

    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    if constants.HF_HUB_OFFLINE:
        raise PublishError("cannot push: HF_HUB_OFFLINE is set (offline mode); unset it to upload")
    token = token or get_token()
    if not token:
        raise PublishError("cannot push: no Hugging Face token; log in with `hf auth login`, set HF_TOKEN, or name "
                           "the variable holding one with --token-env")
    folder = check_publishable(folder)
    _check_reachable(endpoint)
    card = card_for_repo(_read_card(folder / "README.md"), repo_id).encode("utf-8")
    operations = [CommitOperationAdd(name, card if name == "README.md" else str(folder / name))
                  for name in PUBLISH_FILES]
    api = HfApi(endpoint=endpoint, token=token)
    size = sum((folder / name).stat().st_size for name in PUBLISH_FILES) / 1e6
    log.info("uploading %s (%.1f MB) to %s/%s", ", ".join(PUBLISH_FILES), size, endpoint, repo_id)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
                                 revision=revision)
    except _hub_errors() as exc:  # HTTP, connection and metadata errors, as one line
        raise PublishError(_hub_error_line(exc, repo_id, endpoint)) from None
    return str(info.commit_url)


def _read_card(path: Path) -> str:
    """README.md as text: at most MAX_CARD_BYTES of UTF-8, else PublishError naming the file."""
    with path.open("rb") as f:
        data = f.read(MAX_CARD_BYTES + 1)
    if len(data) > MAX_CARD_BYTES:
        raise PublishError(f"{path}: over the limit of {MAX_CARD_BYTES >> 20} MiB for a model card")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PublishError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _check_reachable(endpoint: str, timeout: float = 5.0) -> None:
    """PublishError unless the endpoint can be reached (huggingface_hub itself would retry for long)."""
    from .weights import endpoint_problem

    reason = endpoint_problem(endpoint, timeout=timeout)
    if reason is not None:
        raise PublishError(f"cannot push: no connection to {endpoint} ({reason}); pushing needs network access")


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises for a refused or failed request: OSError (its HTTP errors, requests'), ValueError
    (README.md's metadata), and httpx's errors where it talks through httpx."""
    try:
        from httpx import HTTPError
    except ImportError:
        return OSError, ValueError
    return OSError, ValueError, HTTPError


def _hub_error_line(exc: Exception, repo_id: str, endpoint: str) -> str:
    """One line for an error of huggingface_hub while pushing: what the Hub answered, or why it could not be asked."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    if isinstance(exc, OfflineModeIsEnabled):
        return "cannot push: HF_HUB_OFFLINE is set (offline mode); unset it to upload"
    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", None)
        advice = {401: "; check the token", 403: "; the token needs write access to it"}.get(status, "")
        return f"the Hub refused the push to {repo_id}: {first}{advice}"
    if isinstance(exc, ValueError):  # huggingface_hub's check of README.md's metadata, among others
        return f"cannot push to {repo_id}: {first} {_rest(exc)}".rstrip()
    return f"cannot push to {repo_id} at {endpoint}: {type(exc).__name__}: {first}"


def _rest(exc: Exception) -> str:
    """The lines after the first of an error, joined by "; " (the list of README.md's metadata errors)."""
    return "; ".join(line.strip(" -") for line in str(exc).splitlines()[1:] if line.strip())
