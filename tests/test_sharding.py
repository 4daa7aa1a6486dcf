import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from vlajax.distributed.sharding import (
    fsdp_fallback_spec,
    logical_to_spec,
    make_mesh,
    maybe_initialize_distributed,
    state_shardings,
)

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _multidevice import run_8_devices  # noqa: E402

MESH_2x4 = AbstractMesh((2, 4), ("data", "fsdp"))


@pytest.fixture(scope="module")
def eight_device_run():
    return json.loads(run_8_devices(HERE / "_sharding_worker.py").strip().splitlines()[-1])


def test_mesh_shapes(eight_device_run):
    shapes = eight_device_run["mesh_shapes"]
    assert shapes["8x1"] == {"data": 8, "fsdp": 1}
    assert shapes["2x4"] == {"data": 2, "fsdp": 4}
    assert shapes["1x8"] == {"data": 1, "fsdp": 8}
    assert shapes["-1x4"] == {"data": 2, "fsdp": 4}
    assert shapes["2x-1"] == {"data": 2, "fsdp": 4}


def test_param_shardings_follow_rules(eight_device_run):
    run = eight_device_run["2x4"]
    assert run["specs"] == {
        "w1": str(P("fsdp", None)),      # ("embed", "mlp")
        "b1": str(P(None)),              # ("bias",)
        "w2": str(P(None, "fsdp")),      # ("mlp", "embed")
        "table": str(P(None, "fsdp")),   # unannotated (8, 64): largest dim over fsdp
    }
    assert run["mu_spec"] == str(P("fsdp", None))  # optimizer state inherits annotations
    assert run["batch_spec"] == str(P(("data", "fsdp")))


def test_same_training_on_1_and_8_devices(eight_device_run):
    import _sharding_worker

    assert jax.device_count() == 1
    local = _sharding_worker.train(make_mesh())
    for name in ("one_device", "2x4", "8x1"):
        run = eight_device_run[name]
        np.testing.assert_allclose(run["losses"], local["losses"], rtol=1e-5)
        for k, v in local["params"].items():
            np.testing.assert_allclose(run["params"][k], v, rtol=1e-4, atol=1e-6, err_msg=f"{name}/{k}")
    assert local["losses"][-1] < local["losses"][0]


def test_logical_to_spec_rules():
    assert logical_to_spec(("batch", "seq"), MESH_2x4) == P(("data", "fsdp"), None)
    assert logical_to_spec(("vocab", "embed"), MESH_2x4) == P(None, "fsdp")
    assert logical_to_spec(("vit_embed", "vit_mlp"), MESH_2x4) == P("fsdp", None)
    # a mesh axis is used once: the second "embed" stays replicated
    assert logical_to_spec(("embed", "embed"), MESH_2x4) == P("fsdp", None)
    # not divisible by fsdp=4 -> replicated
    assert logical_to_spec(("embed", "mlp"), MESH_2x4, shape=(4098, 16)) == P(None, None)
    # mesh axis names pass through
    assert logical_to_spec(("fsdp", None), MESH_2x4) == P("fsdp", None)
    with pytest.raises(ValueError, match="unknown logical axis name 'hidden'"):
        logical_to_spec(("hidden",), MESH_2x4, where="['w']")
    with pytest.raises(ValueError, match="2 logical names"):
        logical_to_spec(("embed", "mlp"), MESH_2x4, shape=(4,))


def test_fallback_spec():
    assert fsdp_fallback_spec((8, 64), MESH_2x4, min_size_mbytes=0) == P(None, "fsdp")
    assert fsdp_fallback_spec((6, 7), MESH_2x4, min_size_mbytes=0) == P()
    assert fsdp_fallback_spec((4096, 4096), MESH_2x4) == P("fsdp", None)  # first largest dim
    assert fsdp_fallback_spec((1024,), MESH_2x4) == P()  # small: replicated


def test_state_shardings_names_bad_leaf():
    class M(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(np.zeros((4, 4), np.float32), out_sharding=("embed", "nope"),
                               eager_sharding=False)

    with pytest.raises(ValueError, match=r"\['w'\].*unknown logical axis name 'nope'"):
        state_shardings(nnx.state(M()), make_mesh())


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="data=2 does not divide the 1 available devices"):
        make_mesh(2, -1)
    with pytest.raises(ValueError, match="!= 1 available devices"):
        make_mesh(1, 2)
    assert dict(make_mesh().shape) == {"data": 1, "fsdp": 1}


def test_maybe_initialize_distributed(monkeypatch):
    for k in ("JAX_NUM_PROCESSES", "NUM_PROCESSES", "WORLD_SIZE", "JAX_COORDINATOR_ADDRESS",
              "COORDINATOR_ADDRESS", "MASTER_ADDR", "JAX_PROCESS_ID", "PROCESS_ID", "RANK"):
        monkeypatch.delenv(k, raising=False)
    assert maybe_initialize_distributed() is False
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    assert maybe_initialize_distributed() is False
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(RuntimeError, match="JAX_COORDINATOR_ADDRESS"):
        maybe_initialize_distributed()
