"""The shard machinery shared by `embed` and `predict --output`, on a toy payload (no model): ranks split the
shards, rank 0 merges, a changed plan is refused, damaged shards are redone, foreign files are left alone."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ecanfnet.distributed import DistContext
from ecanfnet.errors import ShardError
from ecanfnet.fileio import write_json_atomically, write_text_atomically
from ecanfnet.shards import (
    ShardedOutput, check_all_shards, manifest_shape_problem, plan_key, remove_parts, run_shards, shard_done)

FILES = [f"photo-{i}.jpg" for i in range(9)]


@dataclass
class Upper(ShardedOutput):
    """A toy run: OUT.txt holds each file name upper-cased, one per line."""

    text: Path
    tool = "toy"
    suffix = ".txt"
    shard_suffixes = (".txt",)
    action = "redoing"

    @property
    def target(self) -> Path:
        return self.text

    def manifest_problem(self, data: Any) -> str | None:
        return manifest_shape_problem(data, 1, {"lines": int}, {"files_sha256": str})

    def shard_problem(self, i: int, plan: dict[str, Any]) -> str | None:
        path = self.shard_file(i, ".txt")
        return None if path.read_text() == _upper(plan["shards"][i]) else f"{path}: not shard {i}'s lines"


def _upper(files: list[str]) -> str:
    return "".join(f.upper() + "\n" for f in files)


def run(out: Upper, plan: dict[str, Any], rank: int = 0, world: int = 1) -> tuple[list[int], Any]:
    """run_shards as rank `rank` of `world` (no process group: the barriers are no-ops); the shards it did."""
    did: list[int] = []

    def work(i: int, files: list[str], advance) -> None:
        did.append(i)
        write_text_atomically(out.shard_file(i, ".txt"), _upper(files))
        advance(len(files))

    def merge() -> int:
        check_all_shards(out, plan)
        text = "".join(out.shard_file(i, ".txt").read_text() for i in range(len(plan["shards"])))
        write_text_atomically(out.text, text)
        write_json_atomically(out.manifest, {"plan": plan_key(plan), "lines": text.count("\n")})
        remove_parts(out)
        return text.count("\n")

    done, reused, merged = run_shards(out, plan, DistContext(rank=rank, world=world), work, merge, progress=False,
                                      desc="toy")
    assert done == len(did)
    return did, merged


def make_plan(out: Upper, **settings: Any) -> dict[str, Any]:
    return out.make_plan(FILES, 2, {"version": 1, "mode": "upper", **settings})


def test_ranks_take_every_world_th_shard_and_rank_0_merges_in_order(tmp_path):
    out = Upper(tmp_path / "out.txt")
    plan = make_plan(out)
    assert [len(s) for s in plan["shards"]] == [2, 2, 2, 2, 1]
    did, merged = run(out, plan, rank=1, world=2)
    assert did == [1, 3] and merged is None and not out.text.exists()  # rank 1 never merges
    did, merged = run(out, plan, rank=0, world=2)
    assert did == [0, 2, 4] and merged == 9
    assert out.text.read_text() == _upper(FILES)
    assert not out.parts.exists()
    assert out.finished_manifest(plan) is not None
    assert out.finished_manifest(make_plan(out, mode="lower")) is None


def test_an_unfinished_run_with_other_settings_is_refused_naming_them(tmp_path):
    out = Upper(tmp_path / "out.txt")
    run(out, make_plan(out), rank=1, world=2)  # leaves OUT.parts behind
    with pytest.raises(ShardError, match=r"other settings \(extra, mode differ\)"):
        run(out, make_plan(out, mode="lower", extra=1))
    other_files = out.make_plan(FILES[:-1], 2, {"version": 1, "mode": "upper"})
    with pytest.raises(ShardError, match=r"\(files_sha256 differ\)"):
        run(out, other_files)
    did, _ = run(out, make_plan(out))
    assert did == [0, 2, 4]


def test_a_damaged_shard_is_redone_and_only_rank_0_says_so(tmp_path, caplog):
    caplog.set_level(logging.INFO, "ecanfnet")
    out = Upper(tmp_path / "out.txt")
    plan = make_plan(out)
    run(out, plan, rank=1, world=2)
    out.shard_file(3, ".txt").write_text("PHOTO-6.JPG\n")  # a shard cut short
    assert not shard_done(out, 3, plan, rank=1)
    assert "redoing shard 3 again" not in caplog.text and not out.shard_file(3, ".txt").exists()
    run(out, plan, rank=1, world=2)
    out.shard_file(1, ".txt").write_text("")
    assert not shard_done(out, 1, plan, rank=0)
    assert f"{out.shard_file(1, '.txt')}: not shard 1's lines; redoing shard 1 again" in caplog.text
    did, _ = run(out, plan)
    assert did == [0, 1, 2, 4] and out.text.read_text() == _upper(FILES)


def test_a_shard_spoilt_before_the_merge_stops_it(tmp_path):
    out = Upper(tmp_path / "out.txt")
    plan = make_plan(out)
    run(out, plan, rank=1, world=2)

    def work(i: int, files: list[str], advance) -> None:
        write_text_atomically(out.shard_file(i, ".txt"), _upper(files))
        out.shard_file(3, ".txt").write_text("?\n")  # another rank's finished shard, spoilt meanwhile

    with pytest.raises(ShardError, match=r"shard-00003.txt: not shard 3's lines; run the same command again"):
        run_shards(out, plan, DistContext(), work, lambda: check_all_shards(out, plan), progress=False, desc="toy")


@pytest.mark.parametrize("case", ["foreign_manifest", "guarded_without_manifest", "foreign_parts", "target_is_a_folder",
                                  "manifest_is_a_folder", "wrong_suffix"])
def test_check_writable_never_replaces_what_the_tool_did_not_write(tmp_path, case):
    class Guarded(Upper):
        def guarded(self) -> tuple[Path, ...]:
            return (self.text,)

    out = Guarded(tmp_path / ("out.csv" if case == "wrong_suffix" else "out.txt"))
    victim = {"foreign_manifest": out.manifest, "guarded_without_manifest": out.text,
              "foreign_parts": out.parts / "notes.txt"}.get(case)
    if victim is not None:
        victim.parent.mkdir(exist_ok=True)
        victim.write_text('{"theme": "dark"}\n')
    if case.endswith("is_a_folder"):
        (out.text if case == "target_is_a_folder" else out.manifest).mkdir()
    with pytest.raises((ShardError, OSError)) as info:
        out.check_suffix()
        out.check_writable()
    message = str(info.value)
    assert "\n" not in message
    if victim is not None:
        assert str(victim if case != "foreign_parts" else out.parts) in message
        assert victim.read_text() == '{"theme": "dark"}\n'
    if case == "wrong_suffix":
        assert "must be a .txt file name" in message


def test_check_writable_lets_a_run_replace_its_own_output(tmp_path):
    class Guarded(Upper):
        def guarded(self) -> tuple[Path, ...]:
            return (self.text,)

    out = Guarded(tmp_path / "out.txt")
    plan = make_plan(out)
    run(out, plan)
    out.check_writable()  # its own manifest beside it
    run(out, make_plan(out, mode="again"))
    assert json.loads(out.manifest.read_text())["plan"]["mode"] == "again"
    out.manifest.unlink()
    with pytest.raises(ShardError, match="exists without the `toy` manifest"):
        out.check_writable()


def test_removing_the_parts_keeps_what_the_tool_did_not_write(tmp_path):
    out = Upper(tmp_path / "out.txt")
    plan = make_plan(out)
    run(out, plan, rank=1, world=2)
    (out.parts / "notes.md").write_text("mine")
    run(out, plan)
    assert out.text.read_text() == _upper(FILES)
    assert sorted(p.name for p in out.parts.iterdir()) == ["notes.md"]


@pytest.mark.parametrize("data, problem", [
    (ValueError("bad"), "unreadable: bad"),
    ([1], "a JSON list, not an object"),
    ({"lines": 1}, "no 'plan' object"),
    ({"plan": {"version": 2}, "lines": 1}, "'plan.version' is 2, expected 1"),
    ({"plan": {"version": 1, "files_sha256": "x"}, "lines": True}, "'lines' is missing or not an int"),
    ({"plan": {"version": 1}, "lines": 1}, "'plan.files_sha256' is missing or not a str"),
    ({"plan": {"version": 1, "files_sha256": "x"}, "lines": 1}, None),
])
def test_manifest_shape_problems_name_the_field(data, problem):
    assert manifest_shape_problem(data, 1, {"lines": int}, {"files_sha256": str}) == problem
