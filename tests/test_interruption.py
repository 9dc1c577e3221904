"""Interruption in real processes: Ctrl-C / SIGTERM stop cleanly, kill -9 never corrupts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from sstream.models import load_checkpoint
from tests.test_train_predict import write_dataset

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def wait_for(predicate, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"the process ended early: {process.communicate()}")
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_at_a_step_and_resume_finishes(tmp_path, signum, code):
    csv_path = write_dataset(tmp_path, count=6)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "sstream", "train", "--train-csv", str(csv_path), "--out",
               str(out), "--epochs", "50", "--tile-size", "32", "--device", "cpu", "--json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=ENV, text=True)
    wait_for(lambda: (out / "last.pt").exists(), process)  # one epoch done
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    model = load_checkpoint(out / "last.pt")  # loadable
    assert model.config.name == "tiny"
    state = torch.load(out / "last.pt", weights_only=True)["train_state"]
    assert state["epoch"] < 50
    resumed = subprocess.run([sys.executable, "-m", "sstream", "train", "--resume", str(out),
                              "--epochs", str(state["epoch"] + 1), "--quiet"],
                             capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    final = torch.load(out / "last.pt", weights_only=True)["train_state"]
    assert final["epoch"] == state["epoch"] + 1 and final["image_index"] == 0


def test_kill_9_while_saving_keeps_the_previous_checkpoint(tmp_path):
    """A process killed in the middle of writing last.pt leaves the old one loadable."""
    csv_path = write_dataset(tmp_path, count=2)
    out = tmp_path / "run"
    marker = tmp_path / "saving"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        import sstream.train as t
        import sstream.training.checkpoint as checkpoint

        real = checkpoint.atomic_output
        calls = {{"n": 0}}

        class SlowWrite:  # the second last.pt (epoch 2) is written slowly
            def __init__(self, path, overwrite=False):
                self.inner = real(path, overwrite=overwrite)
                self.last = Path(path).name == "last.pt"
            def __enter__(self):
                tmp = self.inner.__enter__()
                calls["n"] += self.last
                return SlowPath(tmp) if self.last and calls["n"] > 1 else tmp
            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)

        class SlowPath(type(Path())):
            def write_bytes(self, data):
                with open(self, "wb") as handle:
                    handle.write(data[: len(data) // 2])
                    handle.flush()
                    Path({str(marker)!r}).write_text("half written")
                    time.sleep(60)
                    handle.write(data[len(data) // 2:])

        checkpoint.atomic_output = SlowWrite
        t.train(t.TrainConfig(train_csv={str(csv_path)!r}, out={str(out)!r}, epochs=3,
                              tile_size=32, device="cpu"))
    """)
    process = subprocess.Popen([sys.executable, "-c", script], env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: marker.exists(), process)
    before = (out / "last.pt").read_bytes()
    process.kill()
    process.wait(timeout=30)
    assert (out / "last.pt").read_bytes() == before
    assert load_checkpoint(out / "last.pt").config.name == "tiny"
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert leftovers and all(name.startswith(".last.pt.") for name in leftovers)
