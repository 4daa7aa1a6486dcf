import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlajax.rl.checkpoint import CheckpointManager, CheckpointMismatchError

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _checkpoint_worker import make_state  # noqa: E402
from _multidevice import run_8_devices  # noqa: E402


def _assert_tree_equal(a, b):
    def eq(x, y):
        if jnp.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    jax.tree.map(eq, a, b)


def test_round_trip(tmp_path):
    params, ts = make_state(1.5)
    with CheckpointManager(tmp_path / "ck") as ck:
        assert ck.latest_step() is None
        assert ck.save(5, params, ts, data_state={"epoch": 1, "pos": 17}, config={"lr": 5e-6})
        ck.wait_until_finished()
    with CheckpointManager(tmp_path / "ck") as ck:  # a fresh manager sees the finished save
        assert ck.latest_step() == 5
        r = ck.restore(params=params, train_state=ts)
        assert r.step == 5 and r.data_state == {"epoch": 1, "pos": 17} and r.config == {"lr": 5e-6}
        assert isinstance(r.params, nnx.State)
        _assert_tree_equal(r.params, params)
        _assert_tree_equal(r.train_state, ts)
        assert type(r.train_state["opt_state"][0]) is type(ts["opt_state"][0])  # optax namedtuple
        # params alone, no target: replicated arrays with the saved shapes
        r2 = ck.restore(restore_train_state=False)
        assert r2.train_state is None
        np.testing.assert_array_equal(r2.params["w"], params["w"].get_value())
        with pytest.raises(FileNotFoundError, match="no checkpoint for step 4"):
            ck.restore(4)


def test_params_only_checkpoint(tmp_path):
    with CheckpointManager(tmp_path / "ck") as ck:
        ck.save(0, {"w": jnp.arange(3.0)})
        r = ck.restore()  # waits for the async save
        np.testing.assert_array_equal(r.params["w"], [0.0, 1.0, 2.0])
        assert r.train_state is None and r.data_state == {} and r.config == {}
        with pytest.raises(CheckpointMismatchError, match="has no 'train_state' item"):
            ck.restore(train_state={"step": jnp.zeros(())})


def test_keep_last_n_and_interval(tmp_path):
    params, ts = make_state(1.0)
    with CheckpointManager(tmp_path / "a", max_to_keep=2) as ck:
        for step in range(1, 5):
            ck.save(step, params, ts)
        ck.wait_until_finished()
        assert ck.all_steps() == [3, 4]
    with CheckpointManager(tmp_path / "b", save_interval_steps=2) as ck:
        assert ck.save(1, params, ts)  # the first save is always written
        assert not ck.save(3, params, ts)
        assert ck.save(4, params, ts)
        assert ck.save(5, params, ts, force=True)
        ck.wait_until_finished()
        assert ck.all_steps() == [1, 4, 5]


def test_mismatch_names_the_key(tmp_path):
    params, ts = make_state(1.0)
    with CheckpointManager(tmp_path / "ck") as ck:
        ck.save(1, params, ts)
        ck.wait_until_finished()
        other = nnx.state(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), nnx.Param)  # kernel/bias
        with pytest.raises(CheckpointMismatchError, match=r"not in the checkpoint: \['bias', 'kernel'\]"):
            ck.restore(params=other)
        bigger = {"w": jnp.zeros((16, 9)), "b": jnp.zeros((8,))}
        with pytest.raises(CheckpointMismatchError, match=r"shape of 'w': checkpoint \(16, 8\) vs target \(16, 9\)"):
            ck.restore(params=bigger, restore_train_state=False)


def test_leftover_tmp_dir_is_ignored(tmp_path):
    params, ts = make_state(1.0)
    root = tmp_path / "ck"
    with CheckpointManager(root) as ck:
        ck.save(1, params, ts)
        ck.wait_until_finished()
    junk = root / "2.orbax-checkpoint-tmp" / "params"
    junk.mkdir(parents=True)
    (junk / "garbage").write_bytes(b"\0" * 100)
    with CheckpointManager(root) as ck:
        assert ck.latest_step() == 1
        _assert_tree_equal(ck.restore(params=params).params, params)


def test_killed_during_async_save_keeps_last_good(tmp_path):
    root = tmp_path / "ck"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, str(HERE / "_checkpoint_worker.py"), "crash", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=HERE.parent)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "SAVING", proc.stderr.read()[-3000:]
        proc.send_signal(signal.SIGKILL)  # mid-save, no cleanup
    finally:
        proc.kill()
        proc.wait(30)
    with CheckpointManager(root) as ck:
        latest = ck.latest_step()
        assert latest in (1, 2), ck.all_steps()
        params, ts = make_state(1.0)
        r = ck.restore(1, params=params, train_state=ts)
        _assert_tree_equal(r.params, params)
        if latest == 2:  # the save finished before the kill: it must then be complete
            p2, ts2 = make_state(3.0, big=16)
            r2 = ck.restore(2, train_state=ts2, restore_params=False)
            _assert_tree_equal(r2.train_state["opt_state"][0].mu["w"], ts2["opt_state"][0].mu["w"])


def test_a_failed_save_is_one_clear_error(tmp_path):
    """A save that runs out of space (a real orbax save past a file size limit, in a subprocess): one
    error naming the step, the reason and the steps that stay, nothing else printed (orbax's own
    came after ~600 lines of logged tracebacks and 'Event loop is closed'); the earlier step restores."""
    root = tmp_path / "ck"
    out = subprocess.run([sys.executable, str(HERE / "_checkpoint_worker.py"), "full", str(root)], capture_output=True,
                         text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=HERE.parent, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == (f"ERROR checkpoint {root} step 2 could not be written: File too large (writing "
                                  f"{root}/2.orbax-checkpoint-tmp/params.orbax-checkpoint-tmp/ocdbt.process_0/); "
                                  "the checkpoints committed before it stay ([1])"), out.stdout
    assert out.stderr.count("\n") < 5 and "Traceback" not in out.stderr, out.stderr[-3000:]
    with CheckpointManager(root, read_only=True) as ck:
        params, ts = make_state(1.0)
        assert ck.all_steps() == [1]
        _assert_tree_equal(ck.restore(1, params=params, train_state=ts).params, params)


def test_restore_across_device_counts(tmp_path):
    """1 device saves -> 8 devices restore onto a 2x4 mesh and save sharded -> 1 device restores."""
    params, ts = make_state(2.0)
    with CheckpointManager(tmp_path / "one") as ck:
        ck.save(3, params, ts, data_state={"from": "1 device"})
        ck.wait_until_finished()
    out = run_8_devices(HERE / "_checkpoint_worker.py", "reshard",
                        str(tmp_path / "one"), str(tmp_path / "eight"))
    info = json.loads(out.strip().splitlines()[-1])
    assert info["restored_spec"] == "P('fsdp', None)" and info["restored_devices"] == 8
    assert info["data_state"] == {"from": "1 device"}
    assert info["saved_spec"] == "P('fsdp', None)"
    with CheckpointManager(tmp_path / "eight") as ck:
        r = ck.restore(params=params, train_state=ts)
    assert r.step == 7 and r.config == {"devices": 8}
    assert len(r.params["w"].get_value().sharding.device_set) == 1
    _assert_tree_equal(r.params, params)
    _assert_tree_equal(r.train_state, ts)


def test_a_damaged_checkpoint_is_one_clear_error(tmp_path):
    """A truncated tensor file: one error naming the step, the tensor and the file, and the steps left
    (orbax's own is a TensorStore message inside hundreds of lines of asyncio tracebacks)."""
    from vlajax.rl.checkpoint import CheckpointReadError

    params = {"big": jnp.arange(64 * 1024, dtype=jnp.float32).reshape(64, 1024), "small": jnp.ones(3)}
    with CheckpointManager(tmp_path / "ck") as ck:
        ck.save(1, params)
        ck.save(2, params)
        ck.wait_until_finished()
    data = sorted((tmp_path / "ck" / "2" / "params").glob("ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)
    with open(data[-1], "r+b") as f:
        f.truncate(data[-1].stat().st_size // 2)
    with CheckpointManager(tmp_path / "ck", read_only=True) as ck:
        with pytest.raises(CheckpointReadError) as info:
            ck.restore(2, params=params)
        msg = str(info.value)
        assert "step 2 is damaged" in msg and "'big'" in msg and str(tmp_path / "ck" / "2" / "params") in msg, msg
        assert "have [1]" in msg and "--step 1" in msg, msg
        r = ck.restore(1, params=params)  # the earlier step is intact
        _assert_tree_equal(r.params, params)


def test_read_only_manager_cleans_up_nothing(tmp_path):
    """Opening another run's checkpoints (eval, trainer.resume=<path>) must not delete its in-progress saves."""
    params, ts = make_state(1.0)
    with CheckpointManager(tmp_path / "ck") as ck:
        ck.save(1, params, ts)
    leftover = tmp_path / "ck" / "2.orbax-checkpoint-tmp-123"
    leftover.mkdir()
    with CheckpointManager(tmp_path / "ck", read_only=True) as ck:
        assert ck.latest_step() == 1
    assert leftover.exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CheckpointManager(tmp_path / "nothing", read_only=True)


def test_locate_checkpoint_accepts_what_users_name(tmp_path):
    from vlajax.rl.checkpoint import locate_checkpoint

    params, ts = make_state(1.0)
    run = tmp_path / "run"
    with CheckpointManager(run / "checkpoints") as ck:
        ck.save(3, params, ts)
    root = str(run / "checkpoints")
    assert locate_checkpoint(run) == (root, None)
    assert locate_checkpoint(run / "checkpoints") == (root, None)
    assert locate_checkpoint(run / "checkpoints" / "3") == (root, 3)
    with pytest.raises(FileNotFoundError, match="holds no vlajax checkpoint"):
        locate_checkpoint(tmp_path)
