"""`ecanfnet embed` and `ecanfnet search`: vectors equal the network's pre-logits, bad files skipped,
resumable after SIGKILL, torchrun shards merge to the single-process result, nearest neighbours."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import one_error_line
from ecanfnet.cli import main
from ecanfnet.search import EmbeddingIndex
from ecanfnet.transforms import eval_transform, load_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def collection(tmp_path_factory, photo_dir) -> Path:
    """The six real photos, each also as a rotated copy, plus one corrupt JPEG."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("collection")
    for p in sorted(photo_dir.iterdir()):
        shutil.copy(p, folder / p.name)
        Image.open(p).rotate(90, expand=True).save(folder / f"rot-{p.stem}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def embed_cmd(folder: Path, out: Path, weights: Path, *extra: str) -> list[str]:
    return ["embed", str(folder), "--output", str(out), "--weights", str(weights), "--backend", "torch",
            "--batch-size", "2", "--no-progress", *extra]


def run_module(args: list[str], launcher: list[str] | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *(launcher or []), "-m", "ecanfnet", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, collection, timm_hub_folder) -> Path:
    """One uninterrupted single-process run, shard size 3."""
    out = tmp_path_factory.mktemp("ref") / "emb.npy"
    proc = run_module(embed_cmd(collection, out, timm_hub_folder, "--shard-size", "3"))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stderr  # 1: the broken file was skipped
    assert "broken.jpg" in stderr and "wrote 12 x 2304 vectors" in stdout
    return out


def test_vectors_equal_timm_pre_logits_and_bad_file_is_reported(reference_run, collection, timm_l0):
    vectors = np.load(reference_run)
    paths = reference_run.with_name("emb.paths.txt").read_text().splitlines()
    manifest = json.loads(reference_run.with_name("emb.json").read_text())
    assert vectors.shape == (12, 2304) and vectors.dtype == np.float32
    assert paths == sorted(str(p) for p in collection.iterdir() if p.name != "broken.jpg")
    assert [e["path"] for e in manifest["errors"]] == [str(collection / "broken.jpg")]
    assert manifest["count"] == 12 and manifest["plan"]["weights_fingerprint"]
    assert not reference_run.with_name("emb.parts").exists()  # merged, shards removed

    transform = eval_transform(dict(timm_l0.pretrained_cfg))
    x = torch.stack([transform(load_image(p)) for p in paths])
    with torch.no_grad():
        want = timm_l0.forward_head(timm_l0.forward_features(x), pre_logits=True).numpy()
    rel = np.abs(vectors - want).max() / np.abs(want).max()
    assert rel < 1e-5, rel


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_file(tmp_path, reference_run, collection, timm_hub_folder):
    out = tmp_path / "emb.npy"
    proc = run_module(embed_cmd(collection, out, timm_hub_folder, "--shard-size", "3"))
    first_shard = tmp_path / "emb.parts" / "shard-00000.json"
    deadline = time.monotonic() + 300
    while not first_shard.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert first_shard.exists() and not out.exists(), "the run must be killed part-way"

    other = run_module(embed_cmd(collection, out, timm_hub_folder, "--shard-size", "3", "--normalize"))
    _, stderr = other.communicate(timeout=600)
    assert other.returncode == 1 and "other settings (normalize differ)" in stderr, stderr

    again = run_module(embed_cmd(collection, out, timm_hub_folder, "--shard-size", "3"))
    _, stderr = again.communicate(timeout=600)
    assert "shards already done" in stderr, stderr
    assert out.read_bytes() == reference_run.read_bytes()
    assert out.with_name("emb.paths.txt").read_text() == reference_run.with_name("emb.paths.txt").read_text()


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path, reference_run, collection, timm_hub_folder):
    out = tmp_path / "emb.npy"
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = run_module(embed_cmd(collection, out, timm_hub_folder, "--shard-size", "3"), launcher=launcher)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stderr[-3000:]  # the broken file, as in the single-process run
    assert stdout.count("wrote 12 x 2304 vectors") == 1  # rank 0 alone merges and reports
    np.testing.assert_allclose(np.load(out), np.load(reference_run), rtol=1e-5, atol=1e-6)
    assert out.with_name("emb.paths.txt").read_text() == reference_run.with_name("emb.paths.txt").read_text()


@pytest.mark.parametrize("engine", ["exact", "faiss"])
def test_search_finds_the_query_itself_first(capsys, reference_run, collection, timm_hub_folder, engine):
    if engine == "faiss":
        pytest.importorskip("faiss")
    query = collection / "astronaut.jpg"
    code = main(["search", str(reference_run), "--query", str(query), "-k", "3", "--engine", engine,
                 "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    (result,) = [json.loads(line) for line in out.splitlines()]
    hits = result["neighbours"]
    assert [h["path"] for h in hits][0] == str(query)
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert len(hits) == 3 and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]


def test_exact_search_matches_brute_force(reference_run):
    index = EmbeddingIndex.load(reference_run)
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((4, 2304)).astype(np.float32)
    unit = np.asarray(index.vectors) / np.linalg.norm(index.vectors, axis=1, keepdims=True)
    want = np.argsort(-(queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T, axis=1)[:, :5]
    got = [[h.row for h in hits] for hits in index.search(queries, k=5, engine="exact")]
    assert got == want.tolist()


def test_search_refuses_other_weights(capsys, reference_run, collection, tmp_path):
    from ecanfnet import build_model, save_pretrained

    save_pretrained(build_model(), tmp_path / "other")
    code = main(["search", str(reference_run), "--query", str(collection / "astronaut.jpg"),
                 "--weights", str(tmp_path / "other")])
    assert code == 1 and "are not the weights" in capsys.readouterr().err


# --- hardening: foreign files beside OUT, corrupt indexes, damaged shards ---------------------------

@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    from hostile import small_model_folder

    return small_model_folder(tmp_path_factory.mktemp("small") / "model")


@pytest.mark.parametrize("case", ["foreign_json", "foreign_paths", "foreign_parts", "json_is_a_folder",
                                  "npy_is_a_folder", "output_is_a_folder"])
def test_embed_never_replaces_what_it_did_not_write(capsys, tmp_path, case):
    out = tmp_path / "settings.npy"
    victim = {"foreign_json": out.with_name("settings.json"), "foreign_paths": out.with_name("settings.paths.txt"),
              "foreign_parts": out.with_name("settings.parts") / "notes.txt"}.get(case)
    if victim is not None:
        victim.parent.mkdir(exist_ok=True)
        victim.write_text('{"theme": "dark"}\n')
    if case == "json_is_a_folder":
        out.with_name("settings.json").mkdir()
    if case == "npy_is_a_folder":
        out.mkdir()
    target = tmp_path if case == "output_is_a_folder" else out
    # weights that do not exist: the output is checked before any model is looked for
    code = main(["embed", str(tmp_path), "--output", str(target), "--weights", str(tmp_path / "no-such-weights")])
    err = one_error_line(capsys.readouterr().err)
    assert code == 1 and "no-such-weights" not in err
    if victim is not None:
        assert str(victim if case != "foreign_parts" else victim.parent) in err
        assert victim.read_text() == '{"theme": "dark"}\n'


def test_embed_replaces_its_own_earlier_output(capsys, tmp_path, small_model):
    from hostile import write_pngs

    out = tmp_path / "emb.npy"
    first, second = write_pngs(tmp_path / "one", 2), write_pngs(tmp_path / "two", 3)
    for images, count in ((first, 2), (second, 3)):
        code = main(["embed", *map(str, images), "--output", str(out), "--weights", str(small_model),
                     "--backend", "torch", "--no-progress", "--device", "cpu"])
        assert code == 0, capsys.readouterr().err
        assert np.load(out).shape == (count, 2304)
        assert out.with_name("emb.paths.txt").read_text().splitlines() == [str(p) for p in images]


def test_embed_device_defaults_to_the_ranks_own():
    from ecanfnet.distributed import DistContext, context_or_own, resolve_device

    rank_gpu = torch.device("cuda:1")  # what distributed_setup gives local rank 1 under torchrun
    assert resolve_device(None, rank_gpu) == rank_gpu and resolve_device("cuda", rank_gpu) == rank_gpu
    assert resolve_device("cuda:0", rank_gpu) == torch.device("cuda:0")
    assert resolve_device("cpu", rank_gpu).type == "cpu"
    assert resolve_device(None, torch.device("cpu")).type == "cpu"
    rank1 = DistContext(rank=1, world=2, local_rank=1, device=rank_gpu)  # embed_files' device applied to its context
    with context_or_own(rank1, "cuda") as ctx:
        assert ctx == rank1
    with context_or_own(rank1, "cpu") as ctx:
        assert (ctx.rank, ctx.world, ctx.device) == (1, 2, torch.device("cpu"))



def test_embed_files_takes_a_context_and_leaves_only_a_group_it_joined(tmp_path, small_model, monkeypatch):
    """context=None: a lone process on the device asked for, no process group. A context passed in is the
    caller's: its group is used (barriers) and left in place for the caller to leave."""
    import torch.distributed as dist

    import ecanfnet.embed as embed
    import ecanfnet.shards as shards
    from ecanfnet.distributed import DistContext
    from hostile import write_pngs

    images = [str(p) for p in write_pngs(tmp_path / "images", 2)]
    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):  # not under torchrun
        monkeypatch.delenv(name, raising=False)
    groups = []
    real_barrier = shards.barrier
    monkeypatch.setattr(shards, "barrier", lambda: (groups.append(dist.is_initialized()), real_barrier())[1])
    alone = embed.embed_files(images, tmp_path / "alone.npy", weights=small_model, backend="torch", progress=False,
                              device="cpu")
    assert alone.count == 2 and groups and not any(groups)
    with pytest.raises(TypeError):
        embed.embed_files(images, tmp_path / "positional.npy", small_model)  # options are keyword-only

    groups.clear()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        summary = embed.embed_files(images, tmp_path / "grouped.npy", weights=small_model, backend="torch",
                                    progress=False, context=DistContext(device=torch.device("cpu")))
        assert groups and all(groups) and dist.is_initialized()  # the caller's group: still there
    finally:
        dist.destroy_process_group()
    assert summary.count == 2 and summary.rank == 0
    np.testing.assert_array_equal(np.load(tmp_path / "grouped.npy"), np.load(tmp_path / "alone.npy"))

@pytest.fixture(scope="module")
def small_index(tmp_path_factory, small_model) -> Path:
    from ecanfnet.embed import embed_files
    from hostile import write_pngs

    folder = tmp_path_factory.mktemp("index")
    images = write_pngs(folder / "images", 3)
    embed_files([str(p) for p in images], folder / "emb.npy", weights=small_model, backend="torch", progress=False)
    return folder / "emb.npy"


def copy_index(index: Path, to: Path) -> Path:
    to.mkdir()
    for suffix in (".npy", ".json", ".paths.txt"):
        shutil.copy(index.with_name("emb" + suffix), to / ("emb" + suffix))
    return to / "emb.npy"


def test_search_refuses_corrupt_indexes_in_one_line(capsys, tmp_path, small_index):
    from hostile import corrupt_manifests, hostile_vector_files

    query = str(small_index.parent / "images" / "img_000.png")
    code = main(["search", str(small_index), "--query", query, "-k", "2", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    valid = json.loads(small_index.with_suffix(".json").read_text())
    for name, text in corrupt_manifests(valid).items():
        index = copy_index(small_index, tmp_path / name)
        index.with_suffix(".json").write_bytes(text.encode("utf-8", "surrogateescape"))
        code = main(["search", str(index), "--query", query])
        err = one_error_line(capsys.readouterr().err)
        assert code == 1 and str(index.with_suffix(".json")) in err, (name, err)
    for name, array in hostile_vector_files().items():
        index = copy_index(small_index, tmp_path / name)
        np.save(index, array, allow_pickle=True)
        code = main(["search", str(index), "--query", query])
        err = one_error_line(capsys.readouterr().err)
        assert code == 1 and str(index) in err, (name, err)


def test_damaged_shards_are_embedded_again_on_resume(capsys, caplog, tmp_path, small_model, monkeypatch):
    import logging

    import ecanfnet.embed as embed
    from hostile import write_pngs

    from ecanfnet import create_model

    images = [str(p) for p in write_pngs(tmp_path / "images", 6)]
    kw = dict(model=create_model(pretrained=small_model), backend="torch", shard_size=2, progress=False)
    embed.embed_files(images, tmp_path / "ref.npy", **kw)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stopped after the shards, before the merge
    monkeypatch.setattr(embed, "_merge", killed)
    with pytest.raises(KeyboardInterrupt):
        embed.embed_files(images, tmp_path / "out.npy", **kw)
    monkeypatch.undo()
    parts = tmp_path / "out.parts"
    npy = parts / "shard-00001.npy"
    npy.write_bytes(npy.read_bytes()[: npy.stat().st_size // 2])         # a truncated write
    (parts / "shard-00002.json").write_text('{"paths": ["x"], "errors"')  # a torn record
    capsys.readouterr()

    caplog.set_level(logging.INFO, "ecanfnet")
    summary = embed.embed_files(images, tmp_path / "out.npy", **kw)
    err = capsys.readouterr().err + caplog.text  # status lines: stderr, or the "ecanfnet" logger
    assert f"{npy}: damaged or truncated" in err and f"{parts / 'shard-00002.json'}: unreadable" in err
    assert (summary.shards_embedded, summary.shards_reused, summary.count) == (2, 1, 6)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), np.load(tmp_path / "ref.npy"))
    assert not parts.exists()


def test_only_rank_0_reports_a_damaged_shard(capsys, caplog, tmp_path):
    """Under torchrun each rank checks its own shards; the note that one is embedded again comes from rank 0 only."""
    import logging

    import ecanfnet.embed as embed
    import ecanfnet.shards as shards

    out = embed.EmbedOutput(tmp_path / "emb.npy")
    plan = {"dim": 4, "shards": [["a.png"]]}
    caplog.set_level(logging.INFO, "ecanfnet")
    for rank in (1, 0):
        out.parts.mkdir(exist_ok=True)
        (out.parts / "shard-00000.json").write_text('{"paths": ["a.png"], "errors": []}')
        np.save(out.parts / "shard-00000.npy", np.zeros((1, 3), np.float32))  # one column short
        assert not shards.shard_done(out, 0, plan, rank)
        assert not (out.parts / "shard-00000.npy").exists() and not (out.parts / "shard-00000.json").exists()
        said = capsys.readouterr().err + caplog.text
        caplog.clear()
        assert ("holds float32 (1, 3), expected float32 (1, 4); embedding shard 0 again" in said) == (rank == 0), said
