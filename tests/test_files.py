"""Path expansion: folders and globs never follow directory symlinks, each image is listed once."""

from __future__ import annotations

import glob
import os
import sys
import time

import pytest

from helpers import read_json_lines
from ecanfnet.files import expand_pattern, unique_files, walk_image_files
from ecanfnet.files import find_images
from ecanfnet.training.data import scan_image_folder
from hostile import TREE_WALK_WALL_S, run_measured, small_model_folder, symlink_loop_tree, write_pngs


def test_folders_and_globs_list_each_image_once_in_a_symlink_loop_tree(tmp_path):
    images = sorted(str(p) for p in symlink_loop_tree(tmp_path / "tree"))
    start = time.monotonic()
    dangling = [str(tmp_path / "tree" / "dangling.png")]  # a glob lists it (it then fails by name); a folder walk not
    for arg, expected in ((tmp_path / "tree", images), (tmp_path / "tr*", images),
                          (tmp_path / "tree" / "**", sorted(images + dangling)),
                          (tmp_path / "tree" / "**" / "*.png", sorted(images + dangling))):
        paths, problems = find_images([str(arg)])
        assert sorted(paths) == expected and not problems, arg
    assert walk_image_files(tmp_path / "tree") == images
    assert time.monotonic() - start < TREE_WALK_WALL_S


def test_training_folder_scan_skips_directory_symlinks(tmp_path):
    root = tmp_path / "data"
    cats = symlink_loop_tree(root / "cat")
    dogs = write_pngs(root / "dog", 2, size=16)
    os.symlink(".", root / "loop")  # a "class" that is the data folder itself
    os.symlink("dog", root / "puppy")  # a class folder kept elsewhere: still a class
    classes, samples = scan_image_folder(root)
    assert classes == ["cat", "dog", "puppy"]
    assert samples == ([(str(p), 0) for p in sorted(cats)] + [(str(p), 1) for p in sorted(dogs)]
                       + [(str(root / "puppy" / p.name), 2) for p in sorted(dogs)])


def test_one_helper_drops_links_to_listed_files_for_folders_and_arguments(tmp_path):
    """find_images and walk_image_files share unique_files (they had one copy each)."""
    real = write_pngs(tmp_path, 1, names=["a.png"])[0]
    os.link(real, tmp_path / "hard.png")
    os.symlink("a.png", tmp_path / "sym.png")
    os.mkfifo(tmp_path / "fifo.png")
    paths = [str(tmp_path / n) for n in ("a.png", "hard.png", "sym.png", "fifo.png", "missing.png")]
    seen: set[tuple[int, int]] = set()
    assert unique_files(paths, seen) == [paths[0], paths[3], paths[4]]  # odd paths kept: each gets its error
    assert unique_files([paths[2]], seen) == []  # seen carries over between calls
    assert unique_files(paths, set(), regular_only=True) == [paths[0]]
    assert walk_image_files(tmp_path) == [paths[0]]


@pytest.mark.parametrize("pattern", ["**", "**/*.png", "*/**", "a/**/*.png", "**/b*/**", "*", "a/*", ".hidden/**"])
def test_expand_pattern_matches_glob_without_symlinks(tmp_path, monkeypatch, pattern):
    for name in ("a/b/c/x.png", "a/b/c/y.txt", "a/bb/x.png", "d/x.png", ".hidden/e/x.png", "a/.dot.png", "z.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    for pat in (pattern, str(tmp_path / pattern)):
        assert expand_pattern(pat) == sorted(glob.glob(pat, recursive=True)), pat


@pytest.mark.slow
def test_predict_on_a_recursive_glob_over_symlink_loops_is_bounded(tmp_path):
    """Before: three loop links made this grow without bound (1 GB, no output after 40 s)."""
    images = symlink_loop_tree(tmp_path / "tree", loops=3)
    model = small_model_folder(tmp_path / "model")
    proc, wall, peak_mb = run_measured([sys.executable, "-m", "ecanfnet", "predict", "--weights", str(model),
                                        "--format", "json", "--no-progress", str(tmp_path / "tree" / "**")],
                                       timeout=120)
    rows = read_json_lines(proc.stdout)
    assert sorted(row["path"] for row in rows if "predictions" in row) == sorted(map(str, images))
    assert [row["path"] for row in rows if "error" in row] == [str(tmp_path / "tree" / "dangling.png")]
    assert proc.returncode == 1 and wall < TREE_WALK_WALL_S + 40 and peak_mb < 1500, (wall, peak_mb)
