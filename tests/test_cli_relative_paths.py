"""The installed `vlajax` command run the way the README runs it: in a subprocess, from a fresh working
directory, with relative paths and the defaults (the demo's run directory `runs/demo` is relative).
Orbax refuses relative checkpoint paths, and every other test used absolute ones, so the README's
main job once died at its first checkpoint while the suite stayed green."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_RUN
from tests.reference.hf_layout import write_hf_checkpoint
from tests.reference.torch_oft import OFTSizes, build_torch_oft
from vlajax.model.oft.hf_convert import read_tensors

VLAJAX = Path(sys.executable).parent / "vlajax"  # the console script `pip install` made
# The demo config, shrunk to seconds per step, with its default loggers; the run directory is left at its
# relative default.
SHORT = TINY_RUN + ["trainer.logger=[console,tensorboard,jsonl]"]


def _vlajax(cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as a user's shell: the installed package
    out = subprocess.run([str(VLAJAX), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"vlajax {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


@pytest.mark.slow
def test_train_resume_eval_with_relative_paths(tmp_path):
    assert VLAJAX.exists(), f"the vlajax console script is not installed at {VLAJAX}"
    work = tmp_path / "fresh"
    work.mkdir()
    first = _vlajax(work, "train", *SHORT, "trainer.total_training_steps=2")
    run = work / "runs" / "demo"
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"], first.stdout
    again = _vlajax(work, "train", *SHORT, "trainer.total_training_steps=3", "trainer.resume=auto")
    assert f"resumed from checkpoint {run / 'checkpoints' / '2'} at training step 2" in again.stdout
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s > 0] == [1, 2, 3]
    ev = _vlajax(work, "eval", "runs/demo", "--trials", "1")
    assert "success" in ev.stdout and (run / "eval" / "tabletop_anchored_step3.md").exists(), ev.stdout


def test_convert_both_ways_with_relative_paths(tmp_path):
    assert VLAJAX.exists(), f"the vlajax console script is not installed at {VLAJAX}"
    work = tmp_path / "fresh"
    work.mkdir()
    sizes = OFTSizes.tiny()
    write_hf_checkpoint(build_torch_oft(sizes, seed=3), sizes, work / "hf", dtype=torch.bfloat16, num_shards=2)
    _vlajax(work, "convert", "hf", "out/vlajax", timeout=300)
    _vlajax(work, "convert", "out/vlajax", "out/hf_again", timeout=300)
    a, _ = read_tensors(work / "hf")
    b, _ = read_tensors(work / "out" / "hf_again")
    assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
