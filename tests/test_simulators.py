"""The simulator registry (`vlajax.envs.simulators`) against the simulator modules it names."""

import importlib
import inspect
import pickle

import pytest

from vlajax.config import ConfigError, load_config
from vlajax.envs.simulators import SIMULATORS, simulator, simulator_of_suite

ENV_FN_KEYWORDS = {"suite", "image_size", "cameras", "max_episode_steps", "video_dir"}


def _module(spec):
    """The spec's module, or a skip when an optional dependency it imports is missing."""
    try:
        return importlib.import_module(spec.module)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "vlajax":
            raise
        pytest.skip(f"{spec.module} needs {e.name}, which is not installed")


@pytest.mark.parametrize("name", list(SIMULATORS))
def test_registry_matches_the_simulator_module(name):
    spec = SIMULATORS[name]
    module = _module(spec)
    assert spec.name == name
    assert spec.suites == tuple(module.SUITES)
    params = inspect.signature(module.vector_env_fn).parameters
    assert set(params) == ENV_FN_KEYWORDS
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    if spec.scratch_statistics is not None:
        assert callable(getattr(module, spec.scratch_statistics))


def test_suites_belong_to_one_simulator():
    suites = [s for spec in SIMULATORS.values() for s in spec.suites]
    assert len(suites) == len(set(suites))
    for spec in SIMULATORS.values():
        for suite in spec.suites:
            assert simulator_of_suite(suite) is spec


def test_unknown_simulator_or_suite_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown simulator 'gazebo'; vlajax drives libero, tabletop, isaac"):
        simulator("gazebo")
    with pytest.raises(ValueError, match="'libero_100' is not a known suite; choose one of libero_spatial, .*isaac_reach"):
        simulator_of_suite("libero_100")
    with pytest.raises(ValueError, match=r"'tabletop' is not a LIBERO suite \(libero_spatial, "):
        simulator("libero").env_fn(suite="tabletop", image_size=(8, 8), cameras=("agentview",), max_episode_steps=8)
    with pytest.raises(ConfigError, match="unknown simulator 'gazebo'") as e:
        load_config("demo", ["env.train.simulator_type=gazebo"])
    assert e.value.key == "env.train.simulator_type"
    with pytest.raises(ConfigError, match="'libero_10' is not a tabletop suite") as e:
        load_config("demo", ["env.train.task_suite_name=libero_10"])
    assert e.value.key == "env.train.task_suite_name"


def test_tabletop_env_fn_is_picklable_and_carries_the_run_settings():
    spec = simulator("tabletop")
    _module(spec)
    fn = spec.env_fn(suite="tabletop_anchored", image_size=[48, 64], cameras=["agentview"], max_episode_steps=32)
    back = pickle.loads(pickle.dumps(fn))
    assert back.keywords == {"image_size": (48, 64), "max_episode_steps": 32, "suite": "tabletop_anchored"}


def test_tabletop_scratch_statistics_are_identity_actions_and_the_env_proprio_range():
    from vlajax.envs.tabletop import PROPRIO_HIGH, PROPRIO_LOW
    from vlajax.model.oft.actions import ActionStats

    from vlajax.model.family import get_family

    spec, oft = simulator("tabletop"), get_family("oft")
    key = oft.adapter("tabletop").stats_key
    stats = spec.dataset_statistics(7, key)
    assert set(stats) == {key}
    assert stats[key]["action"] == ActionStats.identity(7, key).to_json()[key]["action"]
    assert stats[key]["proprio"] == {"q01": PROPRIO_LOW.tolist(), "q99": PROPRIO_HIGH.tolist()}
    assert spec.dataset_statistics(7, None) is None
    assert oft.adapter("tabletop").unnorm_key("tabletop", stats) == "tabletop"
    assert oft.adapter("tabletop").unnorm_key("tabletop", {"x": {}}) is None
    assert oft.adapter("libero").unnorm_key("libero_10", {"x": {}}) == "libero_10"
    assert oft.adapter("libero").unnorm_key("libero_10", None) is None
    assert oft.adapter("isaac").unnorm_key("isaac_stack", stats) is None
