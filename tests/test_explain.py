"""Class-activation maps (explain.py): real on a model trained here to find shapes, harmless to the caller's model.

The acceptance test trains a small ECA-NFNet from scratch on generated images holding one shape at a random
place, the class being the shape's kind (so the box of the class-defining object is known), then checks
that the heatmap's peak lies on the object for most held-out images, and that the same check fails for the
mirrored heatmap and for a random one.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ecanfnet.explain import ClassError, Explainer, grad_cam_missing
from ecanfnet.model import ECANFNet, NFNetConfig
from ecanfnet.testing import photo_arrays, randomize_
from ecanfnet.transforms import ImageTooLarge

SIDE = 64
SHAPES = ("square", "disc", "triangle")
# L0's layout shrunk (one block a stage, narrow) and strided 8 instead of 32, so a 64 px image still gets an
# 8 x 8 final feature map (L0 at 224 px gets 7 x 7): the map's resolution, not the network's size, is tested.
SHAPES_NET = NFNetConfig(depths=(1, 1, 1, 1), channels=(32, 32, 64, 64), stem_channels=16, group_size=8,
                         strides=(1, 1, 1, 2))
CELL = SIDE // 8
TRAIN_IMAGES, EPOCHS, BATCH, LR, HELD_OUT = 640, 8, 16, 3e-3, 80
# A peak "on the object": inside its box grown by half a feature-map cell, the resolution the map has.
# Measured here: 91 % of the held-out images for Grad-CAM, 88 % for EigenCAM, 1 % for a mirrored map, 25 % for
# a random one (other seeds: 85-92 %, 87-92 %, 0-2 %, 8-22 %).
MIN_ON_OBJECT = 0.70
TINY = NFNetConfig(depths=(1, 1, 1, 1), channels=(32, 32, 64, 64), stem_channels=16, group_size=8)

pytestmark = pytest.mark.skipif(grad_cam_missing() is not None, reason="needs the explain extra (grad-cam)")


def shape_image(rng: np.random.Generator) -> tuple[Image.Image, int, tuple[int, int, int, int]]:
    """A smooth random background with one shape of a random colour, in the left or right part of the image.

    Shapes keep off the middle column, so a map mirrored left-right never lands on the object.
    Returns (image, class, box (x0, y0, x1, y1) with x1, y1 exclusive).
    """
    ends = rng.uniform(0.2, 0.8, (2, 3))
    ramp = np.linspace(0, 1, SIDE)[:, None, None]
    background = ends[0] * (1 - ramp) + ends[1] * ramp + 0.04 * rng.standard_normal((SIDE, SIDE, 3))
    image = Image.fromarray((np.clip(background, 0, 1) * 255).astype(np.uint8))
    kind, side = int(rng.integers(0, 3)), int(rng.integers(SIDE // 4, SIDE // 3 + 1))
    half, margin = SIDE // 2, SIDE // 16
    left = rng.random() < 0.5
    x0 = int(rng.integers(0, half - margin - side + 1) if left else rng.integers(half + margin, SIDE - side + 1))
    y0 = int(rng.integers(0, SIDE - side + 1))
    x1, y1 = x0 + side - 1, y0 + side - 1
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    draw = ImageDraw.Draw(image)
    if kind == 0:
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif kind == 1:
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    else:
        draw.polygon([(x0, y1), (x1, y1), (x0 + side // 2, y0)], fill=colour)
    return image, kind, (x0, y0, x0 + side, y0 + side)


def shape_set(count: int, seed: int) -> tuple[list[Image.Image], torch.Tensor, list[tuple[int, int, int, int]]]:
    rng = np.random.default_rng(seed)
    images, kinds, boxes = zip(*(shape_image(rng) for _ in range(count)))
    return list(images), torch.tensor(kinds), list(boxes)


@pytest.fixture(scope="session")
def shapes_model():
    """(explainer, held-out images, their classes, their boxes): the model trained from scratch on shape_set."""
    torch.manual_seed(0)
    model = ECANFNet(SHAPES_NET, num_classes=3)
    model.pretrained_cfg = model.pretrained_cfg.as_trained_at(SIDE).replace(label_names=SHAPES)
    explainer = Explainer(model)
    images, kinds, _ = shape_set(TRAIN_IMAGES, seed=0)
    x = torch.stack([explainer.transform(image) for image in images])
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is as fast, and the run is the same on any machine
    try:
        _train(model, x, kinds)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    held_out, held_kinds, boxes = shape_set(HELD_OUT, seed=100)
    return explainer, held_out, held_kinds, boxes


def _train(model: ECANFNet, x: torch.Tensor, kinds: torch.Tensor) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LR, total_steps=EPOCHS * (len(x) // BATCH),
                                                   pct_start=0.15)
    for _ in range(EPOCHS):
        order = torch.randperm(len(x))
        for start in range(0, len(x) - BATCH + 1, BATCH):
            rows = order[start:start + BATCH]
            loss = torch.nn.functional.cross_entropy(model(x[rows]), kinds[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()


def peak(heatmap: np.ndarray) -> tuple[float, float]:
    """(x, y) of the heatmap's maximum (the centre of the pixels that reach it)."""
    ys, xs = np.nonzero(heatmap >= heatmap.max() - 1e-6)
    return float(xs.mean()), float(ys.mean())


def on_object(heatmaps: list[np.ndarray], boxes: list[tuple[int, int, int, int]]) -> float:
    """The fraction of heatmaps whose peak lies in its object's box grown by half a cell."""
    tol = CELL / 2
    hits = [x0 - tol <= x <= x1 + tol and y0 - tol <= y <= y1 + tol
            for (x, y), (x0, y0, x1, y1) in ((peak(h), b) for h, b in zip(heatmaps, boxes))]
    return float(np.mean(hits))


def check_maps_find_the_objects(heatmaps: list[np.ndarray], boxes: list) -> None:
    assert on_object(heatmaps, boxes) >= MIN_ON_OBJECT
    assert on_object([h[:, ::-1] for h in heatmaps], boxes) < MIN_ON_OBJECT  # the check can fail: mirrored
    rng = np.random.default_rng(0)
    assert on_object([rng.random(h.shape, dtype=np.float32) for h in heatmaps], boxes) < MIN_ON_OBJECT  # random


@pytest.mark.slow
def test_grad_cam_of_the_true_class_peaks_on_the_object(shapes_model):
    explainer, images, kinds, boxes = shapes_model
    with torch.no_grad():
        accuracy = (explainer.model(torch.stack([explainer.transform(i) for i in images])).argmax(1) == kinds)
    assert accuracy.float().mean() >= 0.6  # the model did learn the shapes (chance: 1 in 3; measured 0.84)
    maps: list[np.ndarray] = [np.empty(0)] * len(images)
    for kind in range(3):  # each image's map for its true class, one call a class
        rows = [i for i, k in enumerate(kinds.tolist()) if k == kind]
        for i, e in zip(rows, explainer.explain([images[i] for i in rows], SHAPES[kind], "gradcam")):
            assert e.index == kind
            maps[i] = e.heatmap
    check_maps_find_the_objects(maps, boxes)
    other = explainer.explain(images[:1], (int(kinds[0]) + 1) % 3, "gradcam")[0].heatmap
    assert not np.allclose(other, maps[0], atol=1e-3)  # class-specific: another class gets another map


@pytest.mark.slow
def test_eigencam_peaks_on_the_object_whatever_the_class(shapes_model):
    explainer, images, _, boxes = shapes_model
    explanations = explainer.explain(images, None, "eigencam")
    check_maps_find_the_objects([e.heatmap for e in explanations], boxes)
    top, named = explainer.explain(images[:4], None, "eigencam"), explainer.explain(images[:4], "disc", "eigencam")
    assert all(n.label == "disc" for n in named)
    assert all(np.array_equal(a.heatmap, b.heatmap) for a, b in zip(top, named))  # not class-specific: same maps


# --- a small randomised model: what an explanation holds, and what it must leave alone ------------------

@pytest.fixture(scope="module")
def tiny():
    model = randomize_(ECANFNet(TINY, num_classes=3), seed=3)
    model.pretrained_cfg = model.pretrained_cfg.replace(input_size=(3, 64, 64), test_input_size=(3, 64, 64),
                                                        test_crop_pct=0.875, label_names=("cat", "Dog", "fish"))
    return model


def test_an_explanation_is_a_map_over_the_exact_crop_the_model_saw(tiny):
    explainer = Explainer(tiny.eval())
    photo = photo_arrays()["chelsea"]
    (e,) = explainer.explain([photo])
    crop = explainer.transform.resize_and_crop(Image.fromarray(photo))
    assert np.array_equal(np.asarray(e.image), np.asarray(crop)) and e.image.size == (64, 64)
    assert e.heatmap.shape == (64, 64) and e.heatmap.dtype == np.float32
    assert 0 <= e.heatmap.min() and e.heatmap.max() <= 1 and e.heatmap.max() > e.heatmap.min()
    with torch.no_grad():
        probs = tiny(explainer.transform(Image.fromarray(photo))[None]).softmax(-1)[0]
    assert e.index == e.top_index == int(probs.argmax()) and e.label == explainer.labels[e.index]
    assert e.probability == pytest.approx(float(probs.max()), abs=1e-5)
    png = Image.open(io.BytesIO(e.overlay_png()))
    assert png.format == "PNG" and png.size == (64, 64) and png.mode == "RGB"
    assert not np.array_equal(np.asarray(png), np.asarray(crop))  # the heatmap's colours are on it
    (again,) = explainer.explain([Image.fromarray(photo)])
    assert np.array_equal(again.heatmap, e.heatmap)  # deterministic, and PIL images as arrays


def test_the_callers_model_keeps_its_mode_gradients_hooks_and_weights(tiny):
    tiny.train()
    tiny.stem.eval()  # a mixed state, restored module by module
    tiny.head.fc.weight.grad = torch.ones_like(tiny.head.fc.weight)
    tiny.stages[0].requires_grad_(False)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    modes = [m.training for m in tiny.modules()]
    explainer = Explainer(tiny)
    with torch.inference_mode():  # the caller's own context does not stop the gradient the map needs
        (e,) = explainer.explain([photo_arrays()["coffee"]], None, "gradcam")
    (outside,) = explainer.explain([photo_arrays()["coffee"]], e.index, "gradcam")
    explainer.explain([photo_arrays()["coffee"]], "dog", "eigencam")
    assert e.heatmap.max() > 0 and np.array_equal(e.heatmap, outside.heatmap)
    assert [m.training for m in tiny.modules()] == modes
    assert all(not (m._forward_hooks or m._backward_hooks or m._forward_pre_hooks) for m in tiny.modules())
    assert torch.equal(tiny.head.fc.weight.grad, torch.ones_like(tiny.head.fc.weight))
    assert all(p.grad is None for name, p in tiny.named_parameters() if name != "head.fc.weight")
    assert [p.requires_grad for p in tiny.parameters()] == [not n.startswith("stages.0.") for n, _ in
                                                            tiny.named_parameters()]
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    tiny.requires_grad_(True)
    tiny.head.fc.weight.grad = None
    tiny.eval()


@pytest.mark.parametrize("target, index", [(None, None), (2, 2), ("1", 1), (" 0 ", 0), ("fish", 2), ("dog", 1),
                                           (np.int64(1), 1)])
def test_a_class_is_an_index_a_digit_string_or_a_label(tiny, target, index):
    assert Explainer(tiny).class_index(target) == index


@pytest.mark.parametrize("target, message", [
    (3, "class 3 is out of range: the checkpoint has classes 0..2"),
    (-1, "class -1 is out of range"),
    ("dgo", "class 'dgo' is not a label of the checkpoint's 3 classes; close: 'Dog'"),
    ("zebra", "class 'zebra' is not a label of the checkpoint's 3 classes"),
    (1.5, "a class is an index or a label, got float"),
    (True, "a class is an index or a label, got bool"),
])
def test_a_class_the_checkpoint_lacks_is_one_clear_error(tiny, target, message):
    with pytest.raises(ClassError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        Explainer(tiny).class_index(target)


def test_a_label_shared_by_two_classes_must_be_named_by_index(tiny):
    model = randomize_(ECANFNet(TINY, num_classes=3), seed=1)
    model.pretrained_cfg = model.pretrained_cfg.replace(label_names=("crane", "crane", "heron"))
    with pytest.raises(ClassError, match=r"^class 'crane' names 2 classes \(0, 1\): give the index$"):
        Explainer(model).class_index("crane")


def test_refusals_method_model_and_oversized_files(tiny, tmp_path):
    explainer = Explainer(tiny)
    with pytest.raises(ValueError, match="^method must be one of gradcam, eigencam, got 'scorecam'$"):
        explainer.explain([photo_arrays()["rocket"]], method="scorecam")
    with pytest.raises(TypeError, match="need a float ECANFNet classifier, got Linear"):
        Explainer(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no classifier"):
        Explainer(ECANFNet(TINY, num_classes=0))
    big = tmp_path / "big.png"
    Image.fromarray(photo_arrays()["rocket"]).save(big)
    with pytest.raises(ImageTooLarge, match="big.png"):
        explainer.explain([big], max_pixels=10_000)
    with pytest.raises(ValueError, match="uint8"):
        explainer.explain([np.zeros((8, 8, 3), dtype=np.float32)])
    assert explainer.explain([]) == []


def test_without_grad_cam_the_error_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytorch_grad_cam" else real(name, *a))
    assert grad_cam_missing() == "explanations need the grad-cam package: pip install 'ecanfnet[explain]'"


def test_eigencams_component_is_grad_cams_sign_corrected_one():
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

    from ecanfnet.explain import first_component

    activations = np.random.default_rng(0).standard_normal((2, 96, 5, 7)).astype(np.float32) ** 2
    expected = get_2d_projection_with_sign_correction(activations)
    assert np.allclose(np.stack([first_component(a) for a in activations]), expected, atol=1e-4)


def test_imagenet_classes_by_name_synonym_or_index():
    explainer = Explainer(ECANFNet(TINY, num_classes=1000))  # no label names: ImageNet's
    assert [explainer.class_index(t) for t in ("tabby", "Tiger cat", "tabby, tabby cat", "281")] == [281, 282, 281, 281]
    with pytest.raises(ClassError, match=r"^class 'crane' names 2 classes \(134, 517\): give the index$"):
        explainer.class_index("crane")
    with pytest.raises(ClassError, match="close: 'tabby, tabby cat'"):
        explainer.class_index("tabby, tabby kat")
