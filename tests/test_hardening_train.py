"""Issue 12: SIGTERM during training leaves a resumable checkpoint and says how to resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def test_sigterm_during_training_leaves_checkpoint_and_says_resume(mvtec_dir, tmp_path):
    out = tmp_path / "m.safetensors"
    ckdir = out.with_suffix(".training")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "insightad", "train", "--method", "svdd", "--data", str(mvtec_dir),
                             "--out", str(out), "--image-size", "32", "--epochs", "100000", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if ckdir.is_dir() and any(p.suffix == ".safetensors" for p in ckdir.iterdir()):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "--resume" in err and "interrupted" in err and "Traceback" not in err
    assert not out.exists()  # no half-trained model file
