"""moe_routing/ablate/lock.py: one moe-ablate process per output folder: a second holder is refused (in
process, and a second process at once, naming the folder and the holder's pid), and a holder killed with SIGKILL
leaves no stale lock."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_routing.ablate import cli
from moe_routing.ablate.config import get_preset
from moe_routing.ablate.lock import LOCK_NAME, FolderInUseError, folder_lock
from moe_routing.ablate.train import CKPT_NAME, train_run

from helpers import ablate_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data():
    return ablate_data()


def test_folder_lock_refuses_a_second_holder(tmp_path, data):
    """flock conflicts between two opens of the lock file even in one process, so this needs no subprocess."""
    with folder_lock(tmp_path / "run") as lock_file:
        assert lock_file.read_text() == str(os.getpid())
        with pytest.raises(FolderInUseError, match=rf"{re.escape(str(tmp_path / 'run'))} is in use by another "
                                                   rf"moe-ablate process \(pid {os.getpid()}"):
            with folder_lock(tmp_path / "run"):
                pass
        with pytest.raises(FolderInUseError, match="run folder"):
            train_run(get_preset("smoke", steps=2), "topk", 0, data, tmp_path / "run", progress=False)
    with folder_lock(tmp_path / "run"):  # released on exit
        pass
    assert train_run(get_preset("smoke", steps=2), "topk", 0, data, tmp_path / "run", progress=False)


def test_second_process_on_the_same_out_fails_at_once_and_a_killed_holder_leaves_no_stale_lock(tmp_path, capsys):
    """A second moe-ablate on a busy --out stops before touching it (the first one's in-flight temporaries
    survive) and names the folder and the holder's pid; after the holder is killed with SIGKILL the lock file is
    left behind but the next run goes ahead."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"word{i % 97} line{i % 13}" for i in range(4000)))
    out = tmp_path / "out"

    def argv(router, steps):
        return ["--preset", "smoke", "--data", str(corpus), "--routers", router, "--seeds", "0", "--steps",
                str(steps), "--ckpt-interval", "5", "--out", str(out), "--no-progress", "--no-plots"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "holder.err", "wb") as err:
        holder = subprocess.Popen([sys.executable, "-m", "moe_routing.ablate", *argv("relu", 10**9)], cwd=ROOT,
                                  env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        lock_file, deadline = out / LOCK_NAME, time.time() + 1800  # generous: the machine may be loaded
        while holder.poll() is None and time.time() < deadline and not (out / "relu" / "seed0" / CKPT_NAME).exists():
            time.sleep(0.1)  # the holder is training
        assert holder.poll() is None, (tmp_path / "holder.err").read_text()
        in_flight = out / ".results.json.tmp12345"  # what a writer's temporary looks like
        in_flight.write_text("being written")
        assert cli.main(argv("topk", 20)) == 2
        err = capsys.readouterr().err
        assert f"--out folder {out} is in use by another moe-ablate process (pid {holder.pid}" in err
        assert lock_file.read_text() == str(holder.pid)
        assert in_flight.exists() and not (out / "topk").exists()
    finally:
        holder.kill()
        holder.wait(timeout=1800)
    assert lock_file.exists()
    assert cli.main(argv("topk", 20)) == 0
    assert (out / "results.csv").exists() and not in_flight.exists()  # no live writer: a stale temporary now
