"""`vlajax eval CHECKPOINT --suite libero_10`: episodes over a suite's tasks and init states (greedy unless
the config's `val_kwargs` or `--temperature` say otherwise), a per-task success table (markdown, printed
and saved; CSV), a bar chart (PNG) and optional videos.

CHECKPOINT is either
  * a training run directory (`trainer.default_local_dir`: `config.yaml` + `checkpoints/`): the run's
    config rebuilds the policy (LoRA adapters included) and the latest (or `step`) checkpoint's
    parameters are loaded into it; or
  * a policy checkpoint: a vlajax one, a Hugging Face OpenVLA-OFT directory or an openpi π0 checkpoint
    (the family that recognises it loads it: `load_checkpoint`), evaluated with the settings of the
    family's config for the suite's simulator (`PolicyFamily.eval_configs`: `pi0_libero_grpo.yaml`
    for π0 on LIBERO), else the simulator's `eval_config` (`vlajax.envs.simulators`:
    `libero_grpo.yaml` for LIBERO and Isaac, `demo.yaml` for tabletop).
Episodes run through the same Ray simulators and pipelined rollout loop as training.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import jax
from flax import nnx

from vlajax.config import ConfigError, RunConfig, load_config
from vlajax.envs.simulators import simulator_of_suite
from vlajax.eval_report import write_eval_report
from vlajax.metrics import Progress
from vlajax.model.family import family_names, get_family
from vlajax.rl.checkpoint import CheckpointManager
from vlajax.session import SimSession, build_policy, family_call, policy_spec, val_temperature
from vlajax.states import eval_states_line, select_pairs, train_states_line, training_trials

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalResult:
    report: object  # vlajax.eval_report.EvalReport
    episodes: list[dict]
    out_dir: Path
    step: int | None  # training step of a run checkpoint, None for a policy checkpoint


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "checkpoints").is_dir()


def _suite_overrides(suite: str | None) -> list[str]:
    if suite is None:
        return []
    try:
        sim = simulator_of_suite(suite)
    except ValueError as e:
        raise ConfigError(f"--suite {e}", key="env.train.task_suite_name") from None
    return [f"env.train.simulator_type={sim.name}", f"env.train.task_suite_name={suite}"]


def eval_config(checkpoint: Path, suite: str | None, overrides: Sequence[str] = ()) -> RunConfig:
    """The run config an evaluation of `checkpoint` on `suite` uses (see module docstring)."""
    extra = _suite_overrides(suite) + list(overrides)
    if is_run_dir(checkpoint):
        return load_config(checkpoint / "config.yaml", extra)
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    family = checkpoint_family(checkpoint)
    if suite is not None:
        sim = simulator_of_suite(suite)
        base = family.eval_configs.get(sim.name, sim.eval_config) if family else sim.eval_config
    elif family is not None and family.eval_configs:
        base = next(iter(family.eval_configs.values()))
    else:
        base = "demo"
    ckpt = [f"actor_rollout_ref.model.path={checkpoint}", "actor_rollout_ref.model.image_size=null",
            "actor_rollout_ref.model.init_scheme=normal", "actor_rollout_ref.model.action_queries=false"]
    if family is not None:
        ckpt.append(f"actor_rollout_ref.model.family={family.name}")
    return load_config(base, ckpt + extra)


def checkpoint_family(checkpoint: Path):
    """The policy family whose checkpoint format `checkpoint` is in (`PolicyFamily.recognizes`), or
    None when none claims it (the config's family then reads it)."""
    claims = [f for f in map(get_family, family_names()) if f.recognizes(checkpoint)]
    if len(claims) > 1:
        raise ValueError(f"{checkpoint} looks like a checkpoint of {' and of '.join(f.name for f in claims)}")
    return claims[0] if claims else None


def load_eval_policy(cfg: RunConfig, checkpoint: Path, step: int | None = None):
    """(policy, training step or None). A run directory's checkpoint is restored into the policy its
    config builds (LoRA adapters included: `build_policy`); a policy checkpoint is loaded as is."""
    m = cfg.actor_rollout_ref.model
    if not is_run_dir(checkpoint):
        spec = policy_spec(cfg)
        return family_call(cfg, lambda family: family.load_checkpoint(
            checkpoint, param_dtype=m.param_dtype, compute_dtype=m.compute_dtype,
            num_images=cfg.actor_rollout_ref.actor.num_images_in_input, spec=spec)), None
    policy = build_policy(cfg)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          nnx.to_pure_dict(policy.state))
    # read-only: the run may still be training, and its in-progress saves must not be cleaned up
    with CheckpointManager(checkpoint / "checkpoints", read_only=True) as mngr:
        if step is not None and step not in mngr.all_steps():
            raise FileNotFoundError(f"no checkpoint of training step {step} in {mngr.directory}; "
                                    f"have training steps {mngr.all_steps()}")
        restored = mngr.restore(step, params=target, restore_train_state=False)
    nnx.replace_by_pure_dict(policy.state, restored.params)
    return policy, restored.step  # checkpoints are numbered by training step


def run_eval(checkpoint: str | Path, *, suite: str | None = None, trials: int | None = None,
             tasks: Sequence[int | str] | None = None, out_dir: str | Path | None = None, video: bool = False,
             step: int | None = None, temperature: float | None = None, overrides: Sequence[str] = (),
             progress: bool = True) -> EvalResult:
    """Evaluate `checkpoint`; see the module docstring. `trials` defaults to every init state of a LIBERO
    task (50) and to `data.val_num_trials_per_task` (else 50) elsewhere. `temperature`: 0 = greedy;
    default the config's validation decoding (`val_kwargs`; greedy in the LIBERO recipe)."""
    checkpoint = Path(checkpoint).absolute()
    cfg = eval_config(checkpoint, suite, overrides)
    suite_name = cfg.env.train.task_suite_name
    out = Path(out_dir) if out_dir else (checkpoint / "eval" if is_run_dir(checkpoint) else Path("eval") / suite_name)
    out = out.absolute()
    policy, ckpt_step = load_eval_policy(cfg, checkpoint, step)
    temp = val_temperature(cfg) if temperature is None else float(temperature)
    if temp < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {temp}")
    if trials is None and cfg.simulator.init_states_per_task is None:
        trials = cfg.data.val_num_trials_per_task or 50
    video_dir = str(out / "videos") if video else None
    with SimSession(cfg, policy, video_dir=video_dir, temperatures=(temp,)) as sim:
        pairs = select_pairs(sim.tasks, tasks, trials)
        bar = Progress(len(pairs), desc=f"eval {suite_name}", unit="episode") if progress else None
        try:
            def on_round(recs):
                bar.update(len(recs), successes=sum(r["success"] for r in recs),
                           env_steps=sum(r["length"] for r in recs))

            episodes = sim.evaluate(pairs, temperature=temp, on_round=on_round if bar else None)
        finally:
            if bar:
                bar.close()
    at = f" at step {ckpt_step}" if ckpt_step is not None else ""
    name = suite_name if ckpt_step is None else f"{suite_name}_step{ckpt_step}"
    how = f"sampled (temperature {temp:g})" if temp else "greedy"
    t = cfg.env.train
    notes = [eval_states_line(t.simulator_type, sim.tasks, [s for _, s in pairs])]
    if ckpt_step is not None:  # a training run: say what it trained on
        notes.append(train_states_line(t.simulator_type, t.init_states, training_trials(cfg, sim.tasks)))
    report = write_eval_report(episodes, out, name=name, title=f"{checkpoint.name}{at}: {how} success on {suite_name}",
                               notes=notes)
    return EvalResult(report, episodes, out, ckpt_step)
