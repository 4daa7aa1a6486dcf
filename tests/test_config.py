"""The run config: recipe defaults, verl-named overrides, errors that name the key, shipped YAMLs."""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest

from vlajax import config as C
from vlajax.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("demo", "libero_grpo", "libero_grpo_disagg", "pi0_tabletop", "pi0_libero_grpo")
SHIPPED_SFT = ("sft_libero",)  # `vlajax sft` configs (loaded with purpose="sft")
# A directory that exists, standing in for a user's SFT checkpoint where only the config is checked
# (validation checks that actor_rollout_ref.model.path exists; building the policy reads it).
SFT = REPO / "vlajax" / "assets" / "tiny_tokenizer"
LIBERO = [f"actor_rollout_ref.model.path={SFT}"]  # libero_grpo.yaml names a checkpoint the user converts first


def test_defaults_are_the_simplevla_rl_libero_recipe():
    cfg = C.from_dict({})  # the schema's defaults, validated
    a, r = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
    # openvla_oft.md §6 / verl_vla_recipe.md §4.2
    assert (a.optim.lr, a.optim.weight_decay, a.optim.betas) == (5e-6, 0.01, [0.9, 0.999])
    assert (a.clip_ratio_low, a.clip_ratio_high, a.clip_ratio_c) == (0.2, 0.28, 3.0)
    assert (a.ppo_mini_batch_size, a.ppo_micro_batch_size_per_gpu, a.ppo_epochs) == (128, 2, 1)
    assert (a.entropy_coeff, a.use_kl_loss, a.grad_clip) == (0.0, False, 1.0)
    assert (r.n, r.temperature, r.val_kwargs.do_sample) == (8, 1.6, False)
    assert (cfg.algorithm.adv_estimator, cfg.algorithm.norm_adv_by_std_in_grpo) == ("grpo", True)
    assert (cfg.data.train_batch_size, cfg.data.filter_accuracy) == (64, True)
    assert (cfg.data.accuracy_lower_bound, cfg.data.accuracy_upper_bound) == (0.1, 0.9)
    e = cfg.env
    assert (e.train.simulator_type, e.train.task_suite_name) == ("libero", "libero_10")
    assert (e.train.max_episode_steps, e.train.num_trials_per_task) == (512, 50)
    assert (e.rollout.pipeline_stage_num, e.actor.model.num_action_chunks, e.actor.model.action_dim) == (2, 8, 7)
    assert (e.disagg_sim.enable, e.disagg_sim.nnodes) == (False, 1)
    assert cfg.actor_rollout_ref.model.lora_rank == 0  # full-parameter training
    assert cfg.ray.address is None and cfg.trainer.resume == "auto"
    # verl's interpolated run directory is resolved, and made absolute against the working directory
    assert cfg.trainer.default_local_dir == os.path.abspath(
        f"checkpoints/{cfg.trainer.project_name}/{cfg.trainer.experiment_name}")
    # derived sizes: 512 trajectories, 4 optimizer steps, 64 policy calls per episode
    assert (cfg.trajectories_per_step, cfg.optimizer_steps_per_step, cfg.chunks_per_episode) == (512, 4, 64)


def test_libero_grpo_yaml_is_the_recipe():
    """libero_grpo.yaml differs from the recipe defaults only in where the run and model live."""
    diff = C.config_diff(C.from_dict({}), load_config("libero_grpo", LIBERO))
    assert set(diff) <= {"actor_rollout_ref.model.path", "trainer.experiment_name", "trainer.default_local_dir",
                         "env.train.video_cfg.save_video"}, diff


def test_disagg_yaml_differs_only_in_placement():
    base, dis = load_config("libero_grpo", LIBERO), load_config("libero_grpo_disagg", LIBERO)
    diff = C.config_diff(base, dis)
    assert set(diff) == {"env.disagg_sim.enable", "trainer.n_env_gpus_per_node", "trainer.n_rollout_gpus_per_node",
                         "trainer.experiment_name", "trainer.default_local_dir", "ray.address"}, diff
    assert dis.env.disagg_sim.enable and dis.env.disagg_sim.nnodes >= 1
    assert dis.num_sim_workers == dis.trainer.n_env_gpus_per_node * dis.env.disagg_sim.nnodes


def _shipped_yamls() -> list[Path]:
    """Every YAML under configs/ and vlajax/configs/ (the same folder today, by a link)."""
    files = {p.resolve(): p for d in (REPO / "configs", REPO / "vlajax" / "configs") for p in d.glob("*.yaml")}
    return sorted(files.values())


def test_every_shipped_yaml_is_tested():
    assert {p.stem for p in _shipped_yamls()} == set(SHIPPED) | set(SHIPPED_SFT)


@pytest.mark.parametrize("name", SHIPPED_SFT)
def test_shipped_sft_yamls_load_and_validate(name, tmp_path):
    path = next(p for p in _shipped_yamls() if p.stem == name)
    with pytest.raises(ConfigError, match="actor_rollout_ref.model.path.*does not exist"):  # the first error
        load_config(path, purpose="sft")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config(path, LIBERO + [f"data.train_files={tmp_path}"], purpose="sft")
    assert cfg.data.train_files == str(tmp_path) and cfg.actor_rollout_ref.model.lora_rank == 32
    assert "${" not in str(C.to_dict(cfg))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_yamls_load_and_validate(name):
    path = next(p for p in _shipped_yamls() if p.stem == name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a shipped config sets no key that does nothing
        try:
            cfg = load_config(path)
        except ConfigError as e:  # only a checkpoint the user converts first may be missing
            assert e.key == "actor_rollout_ref.model.path" and "does not exist" in str(e), str(e)
            cfg = load_config(path, LIBERO)
    assert C.validate(cfg) is cfg
    assert cfg.trajectories_per_step % cfg.envs_per_round == 0
    assert cfg.rounds_per_step * cfg.envs_per_round == cfg.trajectories_per_step
    assert cfg.trajectories_per_step % cfg.actor_rollout_ref.actor.ppo_mini_batch_size == 0
    assert "${" not in str(C.to_dict(cfg))  # interpolations resolved


def test_default_is_demo_on_tabletop():
    cfg = load_config(None)
    assert cfg == load_config("demo") == load_config(str(REPO / "configs" / "demo.yaml"))
    assert cfg.env.train.simulator_type == "tabletop"
    assert cfg.actor_rollout_ref.model.path == "preset:small"
    assert cfg.ray.address is None


def test_packaged_yamls_are_the_repository_configs():
    shipped = C.packaged_configs()
    assert set(SHIPPED) <= set(shipped)
    for name, path in shipped.items():
        assert (REPO / "configs" / f"{name}.yaml").samefile(path)
        rel = path.relative_to(REPO / "vlajax").as_posix()
        globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["vlajax"]
        assert any(fnmatch.fnmatch(rel, g) for g in globs), (rel, globs)


def test_verl_named_overrides_reach_nested_keys():
    overrides = [
        "env.rollout.pipeline_stage_num=1", "env.train.num_envs=16", "env.train.max_episode_steps=128",
        "env.disagg_sim.enable=true", "env.disagg_sim.nnodes=1", "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.rollout.temperature=1.0", "actor_rollout_ref.actor.optim.lr=1e-5",
        "actor_rollout_ref.actor.clip_ratio_low=0.1", "actor_rollout_ref.actor.clip_ratio_high=0.3",
        "data.train_batch_size=8", "trainer.nnodes=1", "+trainer.n_env_gpus_per_node=2",
        "+trainer.n_rollout_gpus_per_node=3", "trainer.save_freq=7", "trainer.test_freq=-1",
        "trainer.total_training_steps=11", "trainer.logger=[console,jsonl]", "ray.address=auto",
        "actor_rollout_ref.model.target_modules=[q_proj,v_proj]",
    ]
    cfg = load_config("demo", overrides)
    assert cfg.env.rollout.pipeline_stage_num == 1 and cfg.env.train.num_envs == 16
    assert cfg.env.train.max_episode_steps == 128 and cfg.env.disagg_sim.enable is True
    assert cfg.actor_rollout_ref.rollout.n == 4 and cfg.actor_rollout_ref.rollout.temperature == 1.0
    assert cfg.actor_rollout_ref.actor.optim.lr == 1e-5
    assert (cfg.actor_rollout_ref.actor.clip_ratio_low, cfg.actor_rollout_ref.actor.clip_ratio_high) == (0.1, 0.3)
    assert cfg.data.train_batch_size == 8 and cfg.trainer.nnodes == 1
    assert (cfg.trainer.n_env_gpus_per_node, cfg.trainer.n_rollout_gpus_per_node) == (2, 3)
    assert (cfg.trainer.save_freq, cfg.trainer.test_freq, cfg.trainer.total_training_steps) == (7, -1, 11)
    assert cfg.trainer.logger == ["console", "jsonl"] and cfg.ray.address == "auto"
    # disaggregated: simulator workers = per node x simulator nodes, not x trainer.nnodes
    assert cfg.num_sim_workers == 2 and cfg.num_rollout_workers == 3
    # untouched keys keep the demo's values
    demo = load_config("demo")
    assert cfg.actor_rollout_ref.model == dataclasses.replace(demo.actor_rollout_ref.model,
                                                               target_modules=["q_proj", "v_proj"])
    # the later override wins
    assert load_config("demo", ["trainer.seed=1", "trainer.seed=2"]).trainer.seed == 2


def test_lora_targets_and_micro_batch_helpers():
    import re

    m = load_config("demo", ["actor_rollout_ref.model.target_modules=[q_proj,v_proj]"]).actor_rollout_ref.model
    rx = re.compile(m.lora_target_regex())
    assert rx.fullmatch("llm.layers.3.q_proj") and rx.fullmatch("llm.layers.0.v_proj")
    assert not rx.fullmatch("llm.layers.3.o_proj") and not rx.fullmatch("llm.layers.3.xq_proj")
    assert load_config("demo").actor_rollout_ref.model.lora_target_regex() is None  # all-linear
    a = load_config("demo", ["actor_rollout_ref.actor.ppo_micro_batch_size=8"]).actor_rollout_ref.actor
    assert a.micro_batch_size_per_device(4) == 2
    with pytest.raises(ConfigError, match="ppo_micro_batch_size"):
        a.micro_batch_size_per_device(3)


# (overrides on demo.yaml, the key the error must name, a fragment of the message)
BAD = [
    (["actor_rollout_ref.actor.clip_ratio_hi=0.3"], "actor_rollout_ref.actor.clip_ratio_hi",
     "did you mean 'actor_rollout_ref.actor.clip_ratio_high'"),
    (["env.num_envs=4"], "env.num_envs", "did you mean 'env.train.num_envs'"),
    (["trainer.resume_mode=auto"], "trainer.resume_mode", "trainer.resume"),
    (["data.n_samples=8"], "data.n_samples", "actor_rollout_ref.rollout.n"),
    (["nonsense=1"], "nonsense", "valid keys: actor_rollout_ref, algorithm, data, env, ray, trainer"),
    (["data.train_batch_size=abc"], "data.train_batch_size", "wrong type"),
    (["actor_rollout_ref.actor.optim.lr=fast"], "actor_rollout_ref.actor.optim.lr", "wrong type"),
    (["env.disagg_sim.enable=maybe"], "env.disagg_sim.enable", "wrong type"),
    (["trainer.logger=console"], "trainer.logger", "list"),
    (["data=3"], "data", "wrong type"),
    (["data.train_batch_size=3"], "data.train_batch_size", "pipeline_stage_num"),
    (["env.train.num_envs=5"], "data.train_batch_size", "env.train.num_envs=5"),
    (["actor_rollout_ref.actor.ppo_mini_batch_size=12"], "actor_rollout_ref.actor.ppo_mini_batch_size", "divide"),
    (["actor_rollout_ref.actor.clip_ratio_low=1.5"], "actor_rollout_ref.actor.clip_ratio_low", "(0, 1)"),
    (["actor_rollout_ref.actor.clip_ratio_high=-0.1"], "actor_rollout_ref.actor.clip_ratio_high", "> 0"),
    (["actor_rollout_ref.actor.clip_ratio_c=0.5"], "actor_rollout_ref.actor.clip_ratio_c", "> 1"),
    (["env.disagg_sim.enable=true", "env.disagg_sim.nnodes=0"], "env.disagg_sim.nnodes", "simulator node"),
    (["data.accuracy_lower_bound=0.95"], "data.accuracy_lower_bound", "accuracy_upper_bound"),
    (["data.accuracy_upper_bound=1.5"], "data.accuracy_upper_bound", "[0, 1]"),
    (["actor_rollout_ref.rollout.temperature=0"], "actor_rollout_ref.rollout.temperature", "> 0"),
    (["actor_rollout_ref.rollout.n=1"], "actor_rollout_ref.rollout.n", "GRPO"),
    (["algorithm.adv_estimator=ppo"], "algorithm.adv_estimator", "reinforce_plus_plus"),
    (["actor_rollout_ref.model.path=preset:huge"], "actor_rollout_ref.model.path", "preset:small"),
    (["actor_rollout_ref.model.image_size=100"], "actor_rollout_ref.model.image_size", "14"),
    (["actor_rollout_ref.model.target_modules='a('"], "actor_rollout_ref.model.target_modules", "regex"),
    (["trainer.logger=[console"], "trainer.logger", "cannot parse"),
    (["actor_rollout_ref.model.compute_dtype=fp8"], "actor_rollout_ref.model.compute_dtype", "bfloat16"),
    (["env.train.simulator_type=gazebo"], "env.train.simulator_type", "libero, tabletop, isaac"),
    (["env.train.simulator_type=libero"], "env.train.task_suite_name", "LIBERO suite"),
    (["env.train.max_episode_steps=60"], "env.train.max_episode_steps", "num_action_chunks"),
    (["actor_rollout_ref.actor.num_images_in_input=2"], "env.train.init_params.camera_names", "2 distinct"),
    (["trainer.logger=[console,mlflow]"], "trainer.logger", "mlflow"),
    (["trainer.resume=/no/such/checkpoint"], "trainer.resume", "existing checkpoint"),
    (["trainer.save_freq=0"], "trainer.save_freq", "-1"),
    (["actor_rollout_ref.model.init_scheme=xavier"], "actor_rollout_ref.model.init_scheme", "normal, scratch"),
    (["actor_rollout_ref.model.init_scheme=scratch", f"actor_rollout_ref.model.path={SFT}",
      "actor_rollout_ref.model.image_size=null"], "actor_rollout_ref.model.init_scheme", "preset:"),
    # a missing checkpoint is named first, before the keys that only apply to presets
    (["actor_rollout_ref.model.path=/nonexistent"], "actor_rollout_ref.model.path", "does not exist"),
    (["env.rollout.step_timeout_s=0"], "env.rollout.step_timeout_s", "> 0"),
    (["env.train.task_suite_name=tabletop_hard"], "env.train.task_suite_name", "tabletop_anchored"),
    (["trainer.mesh.data=2", "trainer.mesh.fsdp=2", "actor_rollout_ref.actor.ppo_micro_batch_size=6"],
     "actor_rollout_ref.actor.ppo_micro_batch_size", "4 devices"),
    # several train nodes (the head node that launches them loads the config in one process)
    (["trainer.nnodes=2", "data.train_batch_size=3", "env.rollout.pipeline_stage_num=1", "env.train.num_envs=4",
      "actor_rollout_ref.actor.ppo_mini_batch_size=8"], "data.train_batch_size", "split evenly over trainer.nnodes=2"),
    (["trainer.nnodes=2", "actor_rollout_ref.actor.ppo_mini_batch_size=1"], "actor_rollout_ref.actor.ppo_mini_batch_size",
     "split evenly over trainer.nnodes=2"),
    (["trainer.nnodes=2", "env.disagg_sim.enable=true", "env.disagg_sim.nnodes=3"], "env.disagg_sim.nnodes",
     "shared evenly by trainer.nnodes=2"),
]


@pytest.mark.parametrize("overrides,key,fragment", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_errors_name_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_config("demo", overrides)
    assert info.value.key == key
    assert f"'{key}'" in str(info.value) and fragment in str(info.value), str(info.value)


def test_action_queries_are_for_presets_not_hf_checkpoints(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    ckpt = [f"actor_rollout_ref.model.path={tmp_path}", "actor_rollout_ref.model.image_size=null",
            "actor_rollout_ref.model.init_scheme=normal"]
    with pytest.raises(ConfigError, match="has no action queries") as e:
        load_config("demo", ckpt + ["actor_rollout_ref.model.action_queries=true"])
    assert e.value.key == "actor_rollout_ref.model.action_queries"
    assert not load_config("demo", ckpt + ["actor_rollout_ref.model.action_queries=false"]).actor_rollout_ref.model.action_queries


def test_isaac_suites_are_checked():
    with pytest.raises(ConfigError, match="not an Isaac suite") as e:
        load_config("libero_grpo", LIBERO + ["env.train.simulator_type=isaac"])  # libero_10 is not an Isaac suite
    assert e.value.key == "env.train.task_suite_name"
    cfg = load_config("libero_grpo", LIBERO + ["env.train.simulator_type=isaac",
                                               "env.train.task_suite_name=isaac_stack"])
    assert cfg.env.train.simulator_type == "isaac"


def test_malformed_overrides_and_files(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config("demo", ["data.train_batch_size"])
    with pytest.raises(ConfigError, match="list of 'key=value'"):
        load_config("demo", "data.train_batch_size=8")
    with pytest.raises(ConfigError, match="not found; packaged configs: demo, libero_grpo"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  train_batch_sizee: 8\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert info.value.key == "data.train_batch_sizee" and str(bad) in str(info.value)
    assert "did you mean 'data.train_batch_size'" in str(info.value)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("libero_grpo", LIBERO + ["actor_rollout_ref.model.lora_rank=32", "trainer.experiment_name=x",
                                               "actor_rollout_ref.model.target_modules=[q_proj]"])
    path = C.save_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    text = path.read_text()
    assert "${" not in text and "checkpoints/vlajax/x" in text
    assert load_config(path) == cfg
    assert C.from_dict(C.to_dict(cfg)) == cfg
    changed = load_config(path, ["actor_rollout_ref.actor.optim.lr=1e-4"])
    assert C.config_diff(cfg, changed) == {"actor_rollout_ref.actor.optim.lr": (5e-6, 1e-4)}
    assert C.flatten(cfg)["env.rollout.pipeline_stage_num"] == 2


def test_config_objects_are_frozen():
    cfg = load_config("demo")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.train_batch_size = 1  # type: ignore[misc]


def test_loading_a_config_does_not_import_jax():
    code = (f"import sys, vlajax.config as c; c.load_config('libero_grpo', {LIBERO!r}); c.load_config(None); "
            "print(sorted(m for m in ('jax', 'flax', 'mujoco', 'ray', 'robosuite') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_hard_coded_names_match_the_modules():
    """config.py repeats a few names to stay import-light; they must match their owners."""
    import jax.numpy as jnp

    from vlajax.envs.libero import SUITES
    from vlajax.envs.simulators import simulator
    from vlajax.envs.tabletop import SUITES as TABLETOP
    from vlajax.model.oft.config import PRESETS
    from vlajax.model.oft.init import INIT_SCHEMES
    from vlajax.rl.loss import kl_penalty

    assert sorted(C.MODEL_PRESETS) == sorted(PRESETS)
    assert simulator("tabletop").suites == tuple(TABLETOP) and C.INIT_SCHEMES == INIT_SCHEMES
    for t in C.KL_TYPES:
        kl_penalty(jnp.zeros(2), jnp.ones(2), t)  # raises for an unknown type
    for s in SUITES:
        assert load_config("libero_grpo", LIBERO + [f"env.train.task_suite_name={s}"]).env.train.task_suite_name == s


def test_sections_build_their_parts():
    """Learner, optimizer, LoRA, placement and rollout settings come from the config's own methods."""
    cfg = load_config("demo", ["actor_rollout_ref.actor.optim.lr=3e-4",
                               "actor_rollout_ref.actor.optim.betas=[0.8,0.95]",
                               "actor_rollout_ref.actor.ppo_micro_batch_size=8",
                               "actor_rollout_ref.actor.use_kl_loss=true", "actor_rollout_ref.model.lora_rank=4",
                               "env.rollout.step_timeout_s=7"])
    arr, a = cfg.actor_rollout_ref, cfg.actor_rollout_ref.actor
    lc = arr.learner_config(4, True)
    assert (lc.lr, lc.b1, lc.b2, lc.weight_decay, lc.grad_clip) == (3e-4, 0.8, 0.95, a.optim.weight_decay, a.grad_clip)
    assert lc.micro_batch_size == 2 and lc.kl_coef == a.kl_loss_coef and lc.temperature == arr.rollout.temperature
    assert lc.remat == arr.model.enable_gradient_checkpointing and lc.image_flip
    assert a.optim.optimizer(a.grad_clip) is lc.optimizer()  # one optimizer, one compiled step
    lora = arr.model.lora_config(seed=5)
    assert (lora.rank, lora.alpha, lora.seed) == (4, arr.model.lora_alpha, 5)
    assert load_config("demo").actor_rollout_ref.model.lora_config(seed=0) is None
    rc = cfg.rollout_config()
    assert (rc.temperature, rc.seed, rc.step_timeout_s) == (arr.rollout.temperature, cfg.trainer.seed, 7.0)
    assert cfg.num_sim_workers == cfg.placement().num_workers


def test_user_paths_are_made_absolute_once_where_the_config_is_read(tmp_path, monkeypatch):
    """orbax refuses relative checkpoint paths; a saved config must name the same files from anywhere."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sft").mkdir()
    (tmp_path / "other_run").mkdir()
    cfg = load_config("demo", ["trainer.default_local_dir=runs/x", "trainer.resume=other_run", "ray.temp_dir=rt",
                               "env.train.video_cfg.video_base_dir=../videos", "actor_rollout_ref.model.path=sft",
                               "actor_rollout_ref.model.image_size=null", "actor_rollout_ref.model.init_scheme=normal",
                               "actor_rollout_ref.model.action_queries=false"])
    assert cfg.trainer.default_local_dir == str(tmp_path / "runs" / "x") and cfg.run_dir.is_absolute()
    assert cfg.trainer.resume == str(tmp_path / "other_run")
    assert cfg.actor_rollout_ref.model.path == str(tmp_path / "sft")
    assert cfg.env.train.video_cfg.video_base_dir == str(tmp_path.parent / "videos")
    assert cfg.ray.temp_dir == str(tmp_path / "rt")
    assert load_config("demo").actor_rollout_ref.model.path == "preset:small"  # not a path
    assert load_config("demo", ["trainer.resume=disable"]).trainer.resume == "disable"
    # the saved config, read from elsewhere, names the same directories
    C.save_config(cfg, cfg.run_dir)
    monkeypatch.chdir(tmp_path.parent)
    assert load_config(cfg.run_dir / "config.yaml") == cfg


def test_verl_keys_that_do_nothing_warn_when_set():
    assert set(C.VERL_COMPAT_KEYS) <= set(C.flatten(C.RunConfig()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config("demo")  # left at their defaults: silent
    with pytest.warns(UserWarning, match=r"'data.val_batch_size'=16 does nothing"):
        load_config("demo", ["data.val_batch_size=16"])


def test_read_tracking_records_leaf_reads_but_not_copies_or_checks():
    cfg = load_config("demo")
    with C.track_reads() as reads:
        C.to_dict(cfg)
        C.validate(cfg)
        assert reads == set()
        _ = cfg.data.train_batch_size, cfg.env.train.init_params.camera_names
        _ = cfg.actor_rollout_ref.actor.optim  # a section: not a leaf
        _ = cfg.trajectories_per_step  # a derived size reads its leaves
    assert reads == {"data.train_batch_size", "env.train.init_params.camera_names",
                     "actor_rollout_ref.rollout.n"}


def test_init_states_option_is_checked_and_named():
    assert C.from_dict({}).env.train.init_states == "fixed"
    cfg = load_config("libero_grpo", LIBERO + ["env.train.init_states=sampled", "env.train.num_trials_per_task=200"])
    assert cfg.env.train.init_states == "sampled"  # sampled slots per task are not capped at LIBERO's 50
    bad = [
        (LIBERO + ["env.train.init_states=random"], "'random' is not one of fixed, sampled"),
        (["env.train.init_states=sampled"], "the simulator's placement sampler; env.train.simulator_type=tabletop has none"),
    ]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message) as e:
            load_config("libero_grpo" if overrides[0] in LIBERO else "demo", overrides)
        assert e.value.key == "env.train.init_states"
    with pytest.raises(ConfigError, match="init states per task, got 51") as e:
        load_config("libero_grpo", LIBERO + ["env.train.num_trials_per_task=51"])
    assert e.value.key == "env.train.num_trials_per_task"
