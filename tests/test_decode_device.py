"""Decoding on a device of its own (`actor_rollout_ref.rollout.decode_devices=1`), on a CPU split into two
devices (`--xla_force_host_platform_device_count=2`, set before jax starts: so in a child process): the
learner trains on device 0, the decoder decodes on device 1 and gets the weights after each update."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, final_params, same_params

CHILD = r'''
import json, sys
import jax
import numpy as np
from tests.conftest import TINY_RUN
from vlajax.config import load_config
from vlajax.metrics import Timer
from vlajax.train import Trainer, train

root = sys.argv[1]
base = TINY_RUN + ["actor_rollout_ref.rollout.mode=async", "actor_rollout_ref.rollout.decode_devices=1",
                   "ray.enable=false", "trainer.save_freq=2", "trainer.test_freq=2", "actor_rollout_ref.actor.ppo_epochs=1"]
d0, d1 = sorted(jax.devices(), key=lambda d: d.id)
devices = lambda tree: {d for x in jax.tree.leaves(tree) for d in x.devices()}
with Trainer(load_config("demo", base + [f"trainer.default_local_dir={root}/probe"])) as tr:
    assert set(tr.mesh.devices.flat) == {d0} and devices(tr.learner.decode_params()) == {d0}
    assert devices(tr.sim.decoder.params) == {d1}
    batch, _ = tr.collect(Timer())
    before = jax.tree.map(np.asarray, tr.learner.decode_params())
    tr.start_next_rollout()  # hands the decoder a copy on device 1, then rolls out there
    tr.update(batch)  # on device 0, meanwhile
    tr.next_rollout(Timer())
    assert devices(tr.sim.decoder.params) == {d1}
    same = jax.tree.map(lambda a, b: np.array_equal(a, np.asarray(b)), before, tr.sim.decoder.params)
    assert all(jax.tree.leaves(same)), "the decoder's copy is not the weights it was handed"
    tr._hand_over()  # after the update: the new weights reach device 1
    new = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), tr.learner.decode_params(),
                       tr.sim.decoder.params)
    assert all(jax.tree.leaves(new)) and devices(tr.sim.decoder.params) == {d1}
runs = {}
for name, totals in (("straight", (4,)), ("resumed", (2, 4))):
    for total in totals:
        res = train(load_config("demo", base + [f"trainer.total_training_steps={total}",
                                                f"trainer.default_local_dir={root}/{name}"]))
    runs[name] = res
    assert all(m["perf/handoff_bytes"] > 0 and m["perf/handoff_s"] > 0 for m in res.history), res.history
key = lambda m: (m["train/success_rate"], m["actor/loss"], m["actor/ratio_mean"])
assert [key(m) for m in runs["resumed"].history] == [key(m) for m in runs["straight"].history[2:]]
print(json.dumps({"ok": True, "handoff_bytes": runs["straight"].history[0]["perf/handoff_bytes"]}))
'''


@pytest.mark.slow
def test_decoding_on_its_own_device_gets_the_weights_and_resumes_exactly(tmp_path):
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"),
           "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    assert '"ok": true' in out.stdout, out.stdout[-2000:]
    (sa, a), (sb, b) = final_params(tmp_path / "straight"), final_params(tmp_path / "resumed")
    assert sa == sb == 4 and same_params(a, b)  # a resumed run's final weights are the uninterrupted run's
