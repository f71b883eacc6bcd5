"""The output of a run is a folder to publish: OUT holds README.md, config.json and model.safetensors only, the
training state and byproducts live in OUT.training (where --resume finds them; an earlier version's OUT/training/
last.pt is still resumed), and the folder loads in ecanfnet, timm and transformers, with the card's snippets run."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ecanfnet import create_model
from ecanfnet.publish import PUBLISH_FILES, RunSummary, card_for_repo, md
from ecanfnet.training import loop
from ecanfnet.training.loop import TrainingError, train
from ecanfnet.training.state import state_file, training_dir
from helpers import CLASSES, lay_out_hub_cache, make_image_folder, tiny_config, untimed_metrics

pytestmark = pytest.mark.slow  # processes, servers or training runs: `pytest -m "not slow"` skips them

ROOT = Path(__file__).resolve().parents[2]
SIZE = 48


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, folder, timm_hub_folder) -> tuple[Path, list[RunSummary]]:
    """A 2-epoch run, and the summaries of the cards it wrote (each after an improving epoch, and at the end)."""
    cards: list[RunSummary] = []

    def recording(out, run):
        cards.append(run)
        return write(out, run)

    write = loop.write_model_card
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "write_model_card", recording)
        out = train(tiny_config(folder, tmp_path_factory.mktemp("straight") / "out", timm_hub_folder, epochs=2,
                                image_size=SIZE))
    return out, cards


def metrics_rows(out: Path) -> list[dict[str, float]]:
    with (training_dir(out) / "metrics.csv").open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def card_row(what: str, row: dict[str, float]) -> str:
    return (f"| {what} | {int(row['epoch'])} | {100 * row['val_top1']:.1f} % | {100 * row['val_top5']:.1f} % | "
            f"{row['val_loss']:.4f} |")


def test_out_holds_only_the_files_to_publish_and_the_card_reports_the_run(straight, timm_hub_folder):
    out, cards = straight
    assert sorted(p.name for p in out.iterdir()) == sorted(PUBLISH_FILES)
    assert {"last.pt", "metrics.csv"} <= {p.name for p in training_dir(out).iterdir()}
    assert training_dir(out) == out.with_name("out.training")
    rows = metrics_rows(out)
    best = max(rows, key=lambda r: r["val_top1"])
    card = (out / "README.md").read_text()
    assert card_row("last epoch", rows[-1]) in card and card_row("saved weights (best top-1)", best) in card
    assert f"local checkpoint `{md(timm_hub_folder.name)}`" in card and str(timm_hub_folder) not in card
    assert "| astronaut |" in card and f"at {SIZE}x{SIZE}" in card
    # written after the first epoch (always the best so far), after any later improvement, and at the end
    assert len(cards[0].history) == 1 and len(cards[-1].history) == 2 and 2 <= len(cards) <= 3
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_resume_finds_the_state_beside_out(straight, folder, timm_hub_folder, tmp_path):
    out = tmp_path / "out"  # named like the straight run's: the cards must then be the same
    train(tiny_config(folder, out, timm_hub_folder, epochs=1, image_size=SIZE))
    resumed = train(tiny_config(folder, out, timm_hub_folder, epochs=2, image_size=SIZE, resume=True))
    assert untimed_metrics(resumed) == untimed_metrics(straight[0])
    assert (resumed / "README.md").read_text() == (straight[0] / "README.md").read_text()


def lay_out_as_version_0_1(out: Path) -> None:
    """Move a run's state and byproducts where versions up to 0.1 kept them: inside OUT; and drop the card."""
    (out / "training").mkdir()
    shutil.move(state_file(out), out / "training" / "last.pt")
    for name in ("metrics.csv", "curves.png"):
        if (training_dir(out) / name).exists():
            shutil.move(training_dir(out) / name, out / name)
    shutil.rmtree(training_dir(out) / "tensorboard")  # those versions wrote no events
    training_dir(out).rmdir()
    (out / "README.md").unlink()


def test_a_run_of_an_earlier_version_resumes_from_out_training_last_pt(straight, folder, timm_hub_folder, tmp_path):
    out = tmp_path / "old"
    train(tiny_config(folder, out, timm_hub_folder, epochs=1, image_size=SIZE))
    lay_out_as_version_0_1(out)
    with pytest.raises(TrainingError, match=r"already holds .*training/last\.pt"):
        train(tiny_config(folder, out, timm_hub_folder, epochs=2, image_size=SIZE))
    train(tiny_config(folder, out, timm_hub_folder, epochs=2, image_size=SIZE, resume=True))
    assert sorted(p.name for p in out.iterdir()) == sorted(PUBLISH_FILES)  # moved out of OUT, and a card written
    a = torch.load(state_file(straight[0]), weights_only=True)["model"]
    b = torch.load(state_file(out), weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # as if never interrupted
    assert untimed_metrics(out) == untimed_metrics(straight[0])


def test_overwrite_removes_what_an_earlier_version_left_inside_out(folder, timm_hub_folder, tmp_path):
    out = tmp_path / "old"
    train(tiny_config(folder, out, timm_hub_folder, epochs=1, image_size=SIZE))
    lay_out_as_version_0_1(out)
    train(tiny_config(folder, out, timm_hub_folder, epochs=1, image_size=SIZE, lr=0.01, overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == sorted(PUBLISH_FILES)
    assert torch.load(state_file(out), weights_only=True)["settings"]["lr"] == 0.01


def test_a_file_where_out_training_goes_is_refused_before_any_work(timm_hub_folder, tmp_path):
    (tmp_path / "out.training").write_text("mine")
    with pytest.raises(TrainingError, match=r"out\.training: is an existing file, not a folder"):
        train(tiny_config(tmp_path / "no_data", tmp_path / "out", timm_hub_folder, epochs=1))
    assert not (tmp_path / "out").exists()


# --- acceptance: the `train` command's folder in ecanfnet, timm and transformers, and the card's snippets --------

def run(argv: list[str], env: dict[str, str], cwd: Path | None = None,
        stdin: str | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, env=env, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


SNIPPET_RUNNER = """
import contextlib, io, json, sys
printed = []
for code in json.load(sys.stdin):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "snippet", "exec"), {"__name__": "__main__"})
    printed.append(out.getvalue())
print(json.dumps(printed))
"""


def test_a_trained_folder_loads_in_ecanfnet_timm_and_transformers_and_its_card_snippets_run(
        tmp_path, folder, timm_hub_folder):
    pytest.importorskip("transformers.models.timm_wrapper", reason="transformers without its timm wrapper")
    hf = tmp_path / "hf"  # the published checkpoint, as a download leaves it in the cache; no network
    lay_out_hub_cache(hf, "timm/eca_nfnet_l0", {n: timm_hub_folder / n for n in ("config.json", "model.safetensors")})
    env = {**os.environ, "HF_HOME": str(hf), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    out = tmp_path / "flowers"
    run([sys.executable, "-m", "ecanfnet", "train", "--data", str(folder), "--output", str(out), "--epochs", "2",
         "--batch-size", "6", "--image-size", str(SIZE), "--lr", "0.02", "--val-split", "0.2", "--workers", "0",
         "--no-progress"], env)
    assert sorted(p.name for p in out.iterdir()) == sorted(PUBLISH_FILES)

    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "timm/eca_nfnet_l0" and meta["license"] == "apache-2.0"
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-classification"
    assert "fine-tuned from [`timm/eca_nfnet_l0`](https://huggingface.co/timm/eca_nfnet_l0)" in card
    assert card_row("last epoch", metrics_rows(out)[-1]) in card

    photo = folder / "coffee" / "0.jpg"
    expected = _loads_alike_in_ecanfnet_timm_and_transformers(out, photo)

    lay_out_hub_cache(hf, "tester/flowers", {n: out / n for n in PUBLISH_FILES})
    published = card_for_repo(card, "tester/flowers")
    (tmp_path / "work").mkdir()
    shutil.copyfile(photo, tmp_path / "work" / "photo.jpg")
    (command,) = re.findall(r"```bash\n(.*?)\n```", published, re.S)
    assert command == "ecanfnet predict --weights hf-hub:tester/flowers photo.jpg"
    predicted = run([sys.executable, "-m", "ecanfnet", *command.split()[1:], "--format", "json"], env,
                    cwd=tmp_path / "work").stdout
    assert [p["label"] for p in json.loads(predicted)["predictions"]] == expected
    snippets = re.findall(r"```python\n(.*?)```", published, re.S)
    assert len(snippets) == 3 and all("tester/flowers" in s for s in snippets)
    printed = json.loads(run([sys.executable, "-c", SNIPPET_RUNNER], env, cwd=tmp_path / "work",
                             stdin=json.dumps(snippets)).stdout)
    for text in printed:  # ecanfnet's, timm's and transformers' top 3: the three labels, most likely first
        positions = [text.index(f"'{label}'") for label in expected]
        assert positions == sorted(positions), text


def _loads_alike_in_ecanfnet_timm_and_transformers(out: Path, photo: Path) -> list[str]:
    """The labels by decreasing probability, after checking that the three libraries agree on them and on the
    probabilities (each with the preprocessing config.json records)."""
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    from transformers import pipeline

    from ecanfnet import Classifier

    ours = create_model(pretrained=out).eval()
    (result,) = Classifier(ours).predict_files([str(photo)], top_k=3)
    ranked = [(p.label, p.score) for p in result.predictions]
    assert sorted(label for label, _ in ranked) == sorted(CLASSES)

    ref = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert ref.pretrained_cfg["label_names"] == list(CLASSES)
    transform = create_transform(**resolve_data_config({}, model=ref))
    with torch.no_grad():
        probs = ref(transform(Image.open(photo).convert("RGB")).unsqueeze(0)).softmax(-1)[0]
    assert [CLASSES[i] for i in probs.topk(3).indices] == [label for label, _ in ranked]
    assert probs.topk(3).values.tolist() == pytest.approx([score for _, score in ranked], abs=1e-5)

    answers = pipeline("image-classification", model=str(out))(str(photo), top_k=3)
    assert [a["label"] for a in answers] == [label for label, _ in ranked]
    assert [a["score"] for a in answers] == pytest.approx([score for _, score in ranked], abs=1e-4)
    return [label for label, _ in ranked]
