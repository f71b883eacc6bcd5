"""`ecanfnet explain`: an overlay PNG per image under unique names, a line each, bad inputs as lines, clear refusals."""

from __future__ import annotations

import pytest
from PIL import Image

from ecanfnet.cli.explain import output_names
from ecanfnet.explain import grad_cam_missing
from ecanfnet.testing import photo_arrays

from helpers import huge_png_header, one_error_line, read_json_lines

pytestmark = pytest.mark.skipif(grad_cam_missing() is not None, reason="needs the explain extra (grad-cam)")
LABELS = ["tabby", "espresso", "rocket"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from hostile import small_model_folder

    return small_model_folder(tmp_path_factory.mktemp("explain_model"), 3, LABELS, size=64)


@pytest.fixture
def images(tmp_path):
    """Two photos whose names share the stem `photo` (in two folders), a corrupt file and a pixel bomb header."""
    photos = photo_arrays()
    (tmp_path / "in" / "a").mkdir(parents=True)
    (tmp_path / "in" / "b").mkdir()
    Image.fromarray(photos["chelsea"]).save(tmp_path / "in" / "a" / "photo.jpg", quality=90)
    Image.fromarray(photos["coffee"]).save(tmp_path / "in" / "b" / "photo.png")
    (tmp_path / "in" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (tmp_path / "in" / "b" / "bomb.png").write_bytes(huge_png_header(200_000, 200_000))
    return tmp_path / "in"


def test_each_image_gets_its_overlay_and_a_line_and_bad_ones_do_not_stop_the_batch(run_cli, weights, images, tmp_path):
    out = tmp_path / "maps"
    code, stdout, err = run_cli("explain", str(images), "--output", str(out), "--weights", str(weights),
                                "--format", "json", "--no-progress")
    assert code == 1 and err.strip().splitlines()[-1] == "ecanfnet: 2 of 4 inputs failed"
    records = {r["path"]: r for r in read_json_lines(stdout)}
    assert len(records) == 4
    broken, bomb = records[str(images / "a" / "broken.jpg")], records[str(images / "b" / "bomb.png")]
    assert set(broken) == set(bomb) == {"path", "error"} and "broken.jpg" in broken["error"]
    assert "pixels" in bomb["error"]
    written = [records[str(images / "a" / "photo.jpg")], records[str(images / "b" / "photo.png")]]
    assert [r["output"] for r in written] == [str(out / "photo.png"), str(out / "photo-2.png")]
    assert sorted(p.name for p in out.iterdir()) == ["photo-2.png", "photo.png"]  # no temporary files left
    for record in written:
        png = Image.open(record["output"])
        assert png.format == "PNG" and png.size == (64, 64) and (record["width"], record["height"]) == (64, 64)
        assert record["label"] == LABELS[record["index"]] and record["index"] == record["top_index"]
        assert 0 < record["probability"] <= 1 and record["method"] == "gradcam"


def test_a_named_class_by_label_or_index_and_the_table_lines(run_cli, weights, images, tmp_path):
    photo = str(images / "a" / "photo.jpg")
    code, stdout, _ = run_cli("explain", photo, "--output", str(tmp_path / "m"), "--weights", str(weights),
                              "--class", "Espresso", "--method", "eigencam")
    assert code == 0
    assert stdout.splitlines() == [f"{photo}: espresso [1] {stdout.split()[3]} -> {tmp_path / 'm' / 'photo.png'}"]
    code, stdout, _ = run_cli("explain", photo, "--output", str(tmp_path / "m"), "--weights", str(weights),
                              "--class", "2", "--format", "json")
    (record,) = read_json_lines(stdout)
    assert code == 0 and (record["index"], record["label"]) == (2, "rocket")
    code, stdout, _ = run_cli("explain", str(images / "a" / "broken.jpg"), "--output", str(tmp_path / "m"),
                              "--weights", str(weights))
    assert code == 1 and stdout.startswith(f"{images / 'a' / 'broken.jpg'}: error: ") and len(stdout.splitlines()) == 1


@pytest.mark.parametrize("target, message", [
    ("7", "--class: class 7 is out of range: the checkpoint has classes 0..2"),
    ("expresso", "--class: class 'expresso' is not a label of the checkpoint's 3 classes; close: 'espresso'"),
])
def test_a_class_the_checkpoint_lacks_is_one_line_before_any_work(run_cli, weights, images, tmp_path, target, message):
    code, stdout, err = run_cli("explain", str(images), "--output", str(tmp_path / "m"), "--weights", str(weights),
                                "--class", target)
    assert code == 2 and stdout == "" and one_error_line(err) == f"ecanfnet: error: {message}"
    assert not (tmp_path / "m").exists()


def test_an_output_that_is_a_file_is_one_line(run_cli, weights, images, tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    code, stdout, err = run_cli("explain", str(images), "--output", str(blocker), "--weights", str(weights))
    assert code == 1 and stdout == ""
    assert one_error_line(err) == f"ecanfnet: error: {blocker}: is an existing file, not a folder"
    assert blocker.read_text() == "not a folder"


def test_a_bad_method_is_a_usage_error(run_cli, images, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        run_cli("explain", str(images), "--output", str(tmp_path / "m"), "--method", "scorecam")
    assert exit_.value.code == 2


def test_output_names_are_unique_ignoring_case_and_keep_the_stems():
    names = output_names(["a/cat.jpg", "b/cat.png", "c/Cat.jpg", "d/cat-2.jpg", "e/.png", "f/x.y.tif"])
    assert names == {"a/cat.jpg": "cat.png", "b/cat.png": "cat-2.png", "c/Cat.jpg": "Cat-3.png",
                     "d/cat-2.jpg": "cat-2-2.png", "e/.png": ".png.png", "f/x.y.tif": "x.y.png"}
    assert len({n.casefold() for n in names.values()}) == len(names)
