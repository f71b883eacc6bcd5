"""Two-process DistributedDataParallel training on CPU (gloo), launched with torchrun, including a worker
killed mid-run that torchrun's elastic restart (--max-restarts) must recover from, bitwise."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ecanfnet import create_model
from ecanfnet.training.state import state_file, training_dir
from helpers import CPU_ENV, make_image_folder, torchrun_command, torchrun_env, torchrun_train, untimed_metrics

pytestmark = pytest.mark.slow  # processes, servers or training runs: `pytest -m "not slow"` skips them

EPOCHS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("ddp") / "data", per_class=4, size=56)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> tuple[Path, str]:
    """OUT and stderr of a 2-process run of EPOCHS epochs, deterministic, nothing killed."""
    out = tmp_path_factory.mktemp("ddp_straight") / "out"
    proc = torchrun_train(data, out, "--epochs", str(EPOCHS), "--deterministic", env=CPU_ENV)
    return out, proc.stderr


def test_torchrun_two_processes_stay_in_sync_and_write_a_loadable_model(uninterrupted):
    out, stderr = uninterrupted
    assert all(f"epoch {e}: 2 ranks in sync" in stderr for e in range(1, EPOCHS + 1))
    assert stderr.count(f"epoch {EPOCHS}/{EPOCHS}: train loss") == 1  # rank 0 alone reports
    assert len((training_dir(out) / "metrics.csv").read_text().splitlines()) == EPOCHS + 1
    assert len(list((training_dir(out) / "tensorboard").iterdir())) == 1  # rank 0 alone writes events
    assert create_model(pretrained=out).pretrained_cfg["label_names"] == ["astronaut", "coffee", "rocket"]


CONTEXT_SCRIPT = """
import sys

import torch.distributed as dist
from ecanfnet.distributed import distributed_context
from ecanfnet.training.config import TrainConfig
from ecanfnet.training.loop import train

data, out, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
with distributed_context() as ctx:
    train(TrainConfig(data=data, output=out, from_scratch=True, epochs=epochs, batch_size=3, image_size=48,
                      val_split=0.25, workers=0, progress=False, deterministic=True), context=ctx)
    assert dist.is_initialized()  # the caller's group: left by distributed_context, not by train
assert not dist.is_initialized()
print(f"rank {ctx.rank} of {ctx.world} done", flush=True)
"""


def test_a_caller_passing_its_context_trains_bitwise_as_the_command_does(data, uninterrupted, tmp_path):
    script, out = tmp_path / "train_in_context.py", tmp_path / "out"
    script.write_text(CONTEXT_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(data), str(out), str(EPOCHS)],
                          env=torchrun_env(CPU_ENV), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(f"rank {r} of 2 done" in proc.stdout for r in (0, 1)), proc.stdout
    straight = uninterrupted[0]
    a, b = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert untimed_metrics(straight) == untimed_metrics(out)

def worker_pids(launcher: int) -> dict[int, int]:
    """{LOCAL_RANK: pid} of the workers torchrun (pid `launcher`) runs now, read from /proc."""
    workers = {}
    for pid in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        try:  # a worker that has just exited (or not yet exec'd) has no readable LOCAL_RANK
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = next((v.split(b"=", 1)[1] for v in environ if v.startswith(b"LOCAL_RANK=")), None)
        if rank is not None:
            workers[int(rank)] = int(pid)
    return workers


def hold_restarted_worker(proc: subprocess.Popen, local_rank: int, old: set[int], deadline: float,
                          seconds: float = 4.0) -> None:
    """Wait for torchrun to restart the group, then hold its worker `local_rank` (SIGSTOP ... SIGCONT) a while.

    One rank of a real launch is often seconds late (a slower disk, a busy node). The rank that runs
    ahead must wait for its peer's new address, not use the one the killed group left in torchrun's
    store: which of the two ranks opens the gloo connection depends on their random ports, so the
    test holds rank 1 after the first kill and rank 0 after the second.
    """
    while proc.poll() is None and time.time() < deadline:
        pid = worker_pids(proc.pid).get(local_rank)
        if pid is not None and pid not in old:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(seconds)
            os.kill(pid, signal.SIGCONT)
            return
        time.sleep(0.02)


def kill_launch(proc: subprocess.Popen) -> None:
    """SIGKILL a torchrun still running (after a failed assertion) and its workers, which run in their own sessions."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):  # torchrun or a worker may exit meanwhile
            for pid in worker_pids(proc.pid).values():
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains text."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
def test_a_worker_killed_mid_run_is_restarted_and_the_run_ends_bitwise_as_uninterrupted(data, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    # no --resume: a restarted group carries on from the last saved epoch by itself (and --overwrite, which
    # starts the first attempt afresh, must not make a restart start over or refuse)
    proc = subprocess.Popen(torchrun_command(data, out, "--epochs", str(EPOCHS), "--deterministic", "--overwrite",
                                             max_restarts=2),
                            env=torchrun_env(CPU_ENV), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    victims, seen = [], 0
    try:
        deadline = time.time() + 240
        for epoch, hold in ((1, 1), (2, 0)):  # after epoch N is saved, kill rank 1; then hold one restarted rank
            while not any(f"epoch {epoch}/{EPOCHS}: train loss" in line for line in lines[seen:]):
                assert proc.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
                time.sleep(0.02)
            seen = len(lines)
            workers = worker_pids(proc.pid)
            os.kill(workers[1], signal.SIGKILL)
            victims.append(workers[1])
            hold_restarted_worker(proc, hold, set(workers.values()), deadline)
        assert proc.wait(timeout=240) == 0, "".join(lines)[-3000:]
    finally:
        kill_launch(proc)
    reader.join(timeout=10)
    stderr = "".join(lines)
    assert all(f"(pid: {pid})" in stderr for pid in victims), stderr[-3000:]  # torchrun saw both kills
    assert stderr.count("exitcode: -9") == 2 and "connectFullMesh failed" not in stderr, stderr[-3000:]
    resumed = re.findall(rf"resuming {re.escape(str(out))} after epoch (\d)", stderr)
    assert resumed in (["1", "2"], ["1", "3"], ["2", "3"]), stderr[-3000:]  # each restart lost at most an epoch
    assert not processes_mentioning(str(out))  # no worker or data-loader process outlives the run
    straight = uninterrupted[0]
    a, b = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (torch.load(state_file(o), weights_only=True)["model"] for o in (straight, out))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert untimed_metrics(straight) == untimed_metrics(out)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
def test_embed_survives_a_killed_worker_under_torchrun_restarts(tmp_path):
    """`embed` joins the group through the same distributed_setup: a killed rank is restarted and the
    restarted group finishes the remaining shards into the file an uninterrupted run writes."""
    import numpy as np

    from ecanfnet.embed import embed_files
    from hostile import small_model_folder, write_pngs

    weights = small_model_folder(tmp_path / "model", size=32)
    paths = [str(p) for p in write_pngs(tmp_path / "images", 120, size=32)]
    options = ["--weights", str(weights), "--backend", "torch", "--batch-size", "2", "--shard-size", "6",
               "--workers", "1", "--no-progress"]
    out = tmp_path / "elastic.npy"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "-m", "ecanfnet", "embed", str(tmp_path / "images"), "--output", str(out), *options]
    proc = subprocess.Popen(cmd, env=torchrun_env(CPU_ENV), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 180
        while not (tmp_path / "elastic.parts" / "shard-00000.json").exists():  # rank 0's first shard is done
            assert proc.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
            time.sleep(0.01)
        workers = worker_pids(proc.pid)
        os.kill(workers[1], signal.SIGKILL)
        hold_restarted_worker(proc, 1, set(workers.values()), deadline)
        assert proc.wait(timeout=180) == 0, "".join(lines)[-3000:]
    finally:
        kill_launch(proc)
    reader.join(timeout=10)
    stderr = "".join(lines)
    assert f"(pid: {workers[1]})" in stderr and "connectFullMesh failed" not in stderr, stderr[-3000:]
    assert "shards already done" in stderr  # the restarted group kept the finished shards
    assert not processes_mentioning(str(out))
    reference = embed_files(paths, tmp_path / "reference.npy", weights=str(weights), batch_size=2, shard_size=6,
                            backend="torch", workers=1, progress=False)
    assert reference.count == 120
    # same vectors up to float summation order (OMP_NUM_THREADS=1 in the workers, not here)
    np.testing.assert_allclose(np.load(out), np.load(tmp_path / "reference.npy"), rtol=1e-4, atol=1e-5)
    assert out.with_name("elastic.paths.txt").read_text() == (tmp_path / "reference.paths.txt").read_text()


REJOIN_SCRIPT = """
import torch
import torch.distributed as dist
from ecanfnet.distributed import barrier, distributed_context, distributed_setup, leave_process_group


def summed(rank):
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    barrier()
    return total.item()


for round_ in range(6):
    if round_ % 2:  # the group as train() and embed_files() joined it before they took a context
        rank, world, _ = distributed_setup()
        total = summed(rank)
        leave_process_group()
    else:
        with distributed_context("cpu") as ctx:
            rank, total = ctx.rank, summed(ctx.rank)
    assert total == 3.0 and not dist.is_initialized()
    print(f"rank {rank}: group {round_} done", flush=True)
"""


def test_a_process_can_leave_the_group_and_join_a_new_one(tmp_path):
    """A context made by distributed_context (or a group joined by distributed_setup) is left where its work ends,
    so one process may train and embed in turn: each new group must not read the keys of the one before (the gloo
    addresses of closed sockets)."""
    script = tmp_path / "rejoin.py"
    script.write_text(REJOIN_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], env=torchrun_env(CPU_ENV), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(f"rank {r}: group 5 done" in proc.stdout for r in (0, 1)), proc.stdout
    assert "connectFullMesh failed" not in proc.stderr
