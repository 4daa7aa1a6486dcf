"""vlajax.data: LIBERO-layout HDF5 demonstrations, written and read back on real files (no mocks)."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from tests.conftest import DEMO_INSTRUCTION, DEMO_TASK, make_episode
from vlajax.data import (
    DatasetError,
    DemoWriter,
    Episode,
    action_statistics,
    demo_path,
    proprio_statistics,
    read_dataset,
    read_episodes,
)

SUITE, TASK, INSTR = "libero_spatial", DEMO_TASK, DEMO_INSTRUCTION  # TASK, INSTR: make_episode's


def test_no_heavy_imports():
    code = "import sys, vlajax.data; bad = {'jax', 'ray', 'vlajax.model'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_round_trip_bit_exact(tmp_path):
    eps = [make_episode(5, 0, 3), make_episode(7, 1, 9)]
    with DemoWriter(tmp_path, SUITE, TASK, INSTR, bddl_file="x.bddl") as w:
        for ep in eps:
            w.append(ep)
        assert w.num_demos == 2
    path = demo_path(tmp_path, SUITE, TASK)
    assert path == tmp_path / SUITE / f"{TASK}_demo.hdf5"
    got = read_episodes(path, suite=SUITE)
    assert [g.length for g in got] == [5, 7]
    for ep, g in zip(eps, got):
        assert (g.task, g.instruction, g.state_id) == (TASK, INSTR, ep.state_id)
        assert g.proprio.dtype == np.float32 and g.actions.dtype == np.float32
        for c in ep.images:
            np.testing.assert_array_equal(g.images[c], ep.images[c])
        for name in ("proprio", "actions", "states", "joint_states", "eef_quat"):
            np.testing.assert_array_equal(getattr(g, name), getattr(ep, name), err_msg=name)
    with h5py.File(path) as f:  # the LIBERO bookkeeping next to the arrays
        d = f["data"]
        assert (d.attrs["num_demos"], d.attrs["total"], d.attrs["vlajax_suite"]) == (2, 12, SUITE)
        assert json.loads(d.attrs["problem_info"])["language_instruction"] == INSTR
        kw = json.loads(d.attrs["env_args"])["env_kwargs"]
        assert (kw["camera_heights"], kw["control_freq"], kw["bddl_file_name"]) == (8, 20, "x.bddl")
        assert kw["camera_names"] == ["agentview", "robot0_eye_in_hand"]
        g = d["demo_1"]
        assert g.attrs["num_samples"] == 7 and list(g["dones"][()]) == [0] * 6 + [1]
        np.testing.assert_array_equal(g.attrs["init_state"], eps[1].states[0])
        np.testing.assert_array_equal(g["robot_states"][:, :2], eps[1].proprio[:, 6:])
        np.testing.assert_array_equal(g["obs/ee_states"][()], eps[1].proprio[:, :6])
        assert g["obs/eye_in_hand_rgb"].dtype == np.uint8


def test_append_across_sessions(tmp_path):
    with DemoWriter(tmp_path, SUITE, TASK, INSTR) as w:
        w.append(make_episode(state_id=4))
    with h5py.File(demo_path(tmp_path, SUITE, TASK), "a") as f:  # an append killed mid-write
        f["data"].create_group("_partial_1")
    with DemoWriter(tmp_path, SUITE, TASK, INSTR) as w:
        assert w.num_demos == 1 and w.state_ids() == {4}
        w.append(make_episode(seed=1, state_id=8))
        assert w.state_ids() == {4, 8}
    with h5py.File(demo_path(tmp_path, SUITE, TASK)) as f:
        assert sorted(f["data"]) == ["demo_0", "demo_1"] and f["data"].attrs["num_demos"] == 2
    assert [e.state_id for e in read_dataset(tmp_path, suite=SUITE)] == [4, 8]


def write_official(path, t=4, demos=(0, 1), overrides=None):
    """A small file in LIBERO's official layout (as the downloaded ones): no vlajax attributes."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        d = f.create_group("data")
        d.attrs["problem_info"] = json.dumps({"problem_name": "libero_tabletop_manipulation",
                                              "domain_name": "robosuite", "language_instruction": "open the drawer"})
        d.attrs["env_args"] = json.dumps({"type": 1, "env_name": "Libero_Tabletop_Manipulation", "env_kwargs": {}})
        for i in demos:
            g = d.create_group(f"demo_{i}")
            fields = {"actions": rng.uniform(-1, 1, (t, 7)),
                      "obs/agentview_rgb": rng.integers(0, 256, (t, 6, 6, 3), np.uint8),
                      "obs/eye_in_hand_rgb": rng.integers(0, 256, (t, 6, 6, 3), np.uint8),
                      "obs/ee_pos": rng.normal(size=(t, 3)), "obs/ee_ori": rng.normal(size=(t, 3)),
                      "obs/gripper_states": rng.normal(size=(t, 2)), "obs/joint_states": rng.normal(size=(t, 7))}
            fields.update((overrides or {}).get(i, {}))
            for k, v in fields.items():
                if v is not None:
                    g[k] = v


def test_official_layout(tmp_path):
    path = tmp_path / "open_the_drawer_demo.hdf5"
    write_official(path, demos=(0, 1, 10, 2))
    eps = read_episodes(path, suite="libero_10")  # official files carry no suite: any suite reads them
    assert len(eps) == 4
    with h5py.File(path) as f:
        for ep, name in zip(eps, ["demo_0", "demo_1", "demo_2", "demo_10"]):  # demo-index order
            o = f[f"data/{name}/obs"]
            assert (ep.task, ep.instruction) == ("open_the_drawer", "open the drawer")
            assert ep.state_id is None and ep.states is None
            want = np.concatenate([o["ee_pos"], o["ee_ori"], o["gripper_states"]], -1).astype(np.float32)
            np.testing.assert_array_equal(ep.proprio, want)
            np.testing.assert_array_equal(ep.actions, f[f"data/{name}/actions"][()].astype(np.float32))
            np.testing.assert_array_equal(ep.images["robot0_eye_in_hand"], o["eye_in_hand_rgb"][()])
            np.testing.assert_array_equal(ep.joint_states, o["joint_states"][()])


def _expect(path, *fragments, **kw):
    with pytest.raises(DatasetError) as e:
        read_episodes(path, **kw)
    for s in (path.name, *fragments):
        assert s in str(e.value), (s, str(e.value))


def test_bad_files(tmp_path):
    _expect(tmp_path / "missing_demo.hdf5", "no such file")
    (p := tmp_path / "text_demo.hdf5").write_text("not hdf5")
    _expect(p, "HDF5")
    with h5py.File(p := tmp_path / "nodata_demo.hdf5", "w") as f:
        f.create_group("other")
    _expect(p, "'data'")
    with h5py.File(p := tmp_path / "noinfo_demo.hdf5", "w") as f:
        f.create_group("data")
    _expect(p, "problem_info")
    t = 4
    cases = {
        "noactions": ({3: {"actions": None}}, ["data/demo_3/actions"]),
        "noimage": ({3: {"obs/agentview_rgb": None}}, ["data/demo_3/obs/agentview_rgb"]),
        "nogripper": ({3: {"obs/gripper_states": None}}, ["data/demo_3/obs/gripper_states"]),
        "dim": ({3: {"actions": np.zeros((t, 6))}}, ["data/demo_3/actions", "(4, 6)", "(T, 7)"]),
        "length": ({3: {"obs/agentview_rgb": np.zeros((t + 1, 6, 6, 3), np.uint8)}},
                   ["data/demo_3/obs/agentview_rgb", "5 steps", "actions has 4"]),
        "nan": ({3: {"actions": np.full((t, 7), np.nan)}}, ["data/demo_3/actions", "NaN"]),
    }
    for name, (overrides, fragments) in cases.items():
        write_official(p := tmp_path / f"{name}_demo.hdf5", t=t, demos=(0, 3), overrides=overrides)
        _expect(p, *fragments)
    # eye_in_hand is required only when asked for
    write_official(p := tmp_path / "noeye_demo.hdf5", demos=(0,), overrides={0: {"obs/eye_in_hand_rgb": None}})
    assert list(read_episodes(p, cameras=("agentview",))[0].images) == ["agentview"]
    _expect(p, "data/demo_0/obs/eye_in_hand_rgb")


def test_suite_mismatch(tmp_path):
    with DemoWriter(tmp_path, SUITE, TASK, INSTR) as w:
        w.append(make_episode())
    _expect(demo_path(tmp_path, SUITE, TASK), SUITE, "libero_goal", suite="libero_goal")
    with pytest.raises(DatasetError, match="no .*_demo.hdf5"):
        read_dataset(tmp_path / "empty")


def test_writer_rejects_bad_episodes(tmp_path):
    with DemoWriter(tmp_path, SUITE, TASK, INSTR) as w:
        ep = make_episode()
        bad = {
            "actions": dict(actions=ep.actions[:4]),
            "images['agentview']": dict(images={**ep.images, "agentview": ep.images["agentview"] / 255.0}),
            "proprio": dict(proprio=ep.proprio[:, :6]),
            "states": dict(states=ep.states.astype(np.int64)),
        }
        for field, change in bad.items():
            with pytest.raises(DatasetError) as e:
                w.append(Episode(**{**vars(ep), **change}))
            assert field in str(e.value) and w.path.name in str(e.value), str(e.value)
        with pytest.raises(DatasetError, match="NaN"):
            w.append(Episode(**{**vars(ep), "actions": np.full_like(ep.actions, np.inf)}))
        assert w.num_demos == 0


def test_statistics(tmp_path):
    eps = [make_episode(5, 0), make_episode(9, 1)]
    acts = np.concatenate([e.actions for e in eps]).astype(np.float64)
    s = action_statistics(eps)
    np.testing.assert_allclose(s["q01"], np.quantile(acts, 0.01, axis=0))
    np.testing.assert_allclose(s["q99"], np.quantile(acts, 0.99, axis=0))
    for k, fn in [("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max)]:
        np.testing.assert_allclose(s[k], fn(acts, axis=0), err_msg=k)
    assert s["mask"] == [True] * 6 + [False]
    assert all(isinstance(v, float) for v in s["q01"])
    json.dumps(s)  # the norm_stats layout, JSON-serialisable
    p = proprio_statistics(eps)
    props = np.concatenate([e.proprio for e in eps]).astype(np.float64)
    np.testing.assert_allclose(p["q99"], np.quantile(props, 0.99, axis=0))
    assert len(p["mask"]) == 8
