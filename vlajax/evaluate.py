"""`vlajax eval CHECKPOINT --suite libero_10`: episodes over a suite's tasks and init states (greedy unless
the config's `val_kwargs` or `--temperature` say otherwise), a per-task success table (markdown, printed
and saved; CSV), a bar chart (PNG) and optional videos.

CHECKPOINT is either
  * a training run directory (`trainer.default_local_dir`: `config.yaml` + `checkpoints/`): the run's
    config rebuilds the policy (LoRA adapters included) and the latest (or `step`) checkpoint's
    parameters are loaded into it; or
  * a vlajax policy checkpoint or a Hugging Face OpenVLA-OFT directory (`load_pretrained`), evaluated
    with the simulator settings of `libero_grpo.yaml` (LIBERO suites) or `demo.yaml` (tabletop).
Episodes run through the same Ray simulators and pipelined rollout loop as training.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

from vlajax.config import TABLETOP_SUITES, ConfigError, RunConfig, load_config

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
    from vlajax.envs.isaac import ISAAC_SUITES
    from vlajax.envs.libero import SUITES

    if suite in SUITES:
        sim = "libero"
    elif suite in TABLETOP_SUITES:
        sim = "tabletop"
    elif suite in ISAAC_SUITES:
        sim = "isaac"
    else:
        raise ConfigError(f"--suite {suite!r} is not a known suite; choose one of "
                          f"{', '.join(SUITES + TABLETOP_SUITES + tuple(ISAAC_SUITES))}", key="env.train.task_suite_name")
    return [f"env.train.simulator_type={sim}", f"env.train.task_suite_name={suite}"]


def eval_config(checkpoint: Path, suite: str | None, overrides: Sequence[str] = ()) -> RunConfig:
    """The run config an evaluation of `checkpoint` on `suite` uses (see module docstring)."""
    extra = _suite_overrides(suite) + list(overrides)
    if is_run_dir(checkpoint):
        return load_config(checkpoint / "config.yaml", extra)
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    hf = (checkpoint / "config.json").exists()
    base = "demo" if suite in TABLETOP_SUITES or (suite is None and not hf) else "libero_grpo"
    ckpt = [f"actor_rollout_ref.model.path={checkpoint}", "actor_rollout_ref.model.image_size=null",
            "actor_rollout_ref.model.init_scheme=normal", "actor_rollout_ref.model.action_queries=false"]
    return load_config(base, ckpt + extra)


def load_eval_policy(cfg: RunConfig, checkpoint: Path, step: int | None = None):
    """(policy, training step or None). A run directory's checkpoint is restored into the policy its
    config builds; a policy checkpoint is loaded as is."""
    from flax import nnx

    from vlajax.model import load_pretrained
    from vlajax.session import build_policy, lora_config

    m = cfg.actor_rollout_ref.model
    if not is_run_dir(checkpoint):
        return load_pretrained(checkpoint, dtype=m.param_dtype, compute_dtype=m.compute_dtype,
                               num_images=cfg.actor_rollout_ref.actor.num_images_in_input), None
    import jax

    from vlajax.rl.checkpoint import CheckpointManager
    from vlajax.rl.lora import apply_lora

    policy = build_policy(cfg)
    lora = lora_config(cfg)
    if lora is not None:  # the run trained adapters: its checkpoint holds them
        model = policy.model
        apply_lora(model, lora)
        policy.set_model(model)
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


def select_pairs(tasks: Sequence[tuple], task_ids: Sequence[int | str] | None, trials: int | None) -> list[tuple[int, int]]:
    """(task_id, state_id) pairs: the first `trials` init states of each selected task (by id or name)."""
    names = [t[0] for t in tasks]
    if task_ids:
        chosen = []
        for t in task_ids:
            if isinstance(t, str) and not t.isdigit():
                if t not in names:
                    raise ValueError(f"--tasks: no task named {t!r}; tasks are {names}")
                chosen.append(names.index(t))
            else:
                i = int(t)
                if not 0 <= i < len(tasks):
                    raise ValueError(f"--tasks: task id {i} is out of range (the suite has {len(tasks)} tasks)")
                chosen.append(i)
    else:
        chosen = list(range(len(tasks)))
    if trials is not None and trials < 1:
        raise ValueError(f"--trials must be >= 1, got {trials}")
    return [(ti, s) for ti in chosen for s in range(min(trials or tasks[ti][2], tasks[ti][2]))]


def run_eval(checkpoint: str | Path, *, suite: str | None = None, trials: int | None = None,
             tasks: Sequence[int | str] | None = None, out_dir: str | Path | None = None, video: bool = False,
             step: int | None = None, temperature: float | None = None, overrides: Sequence[str] = (),
             progress: bool = True) -> EvalResult:
    """Evaluate `checkpoint`; see the module docstring. `trials` defaults to every init state of a LIBERO
    task (50) and to `data.val_num_trials_per_task` (else 50) elsewhere. `temperature`: 0 = greedy;
    default the config's validation decoding (`val_kwargs`; greedy in the LIBERO recipe)."""
    from vlajax.eval_report import write_eval_report
    from vlajax.metrics import Progress
    from vlajax.session import SimSession, val_temperature

    checkpoint = Path(checkpoint).absolute()
    cfg = eval_config(checkpoint, suite, overrides)
    suite_name = cfg.env.train.task_suite_name
    out = Path(out_dir) if out_dir else (checkpoint / "eval" if is_run_dir(checkpoint) else Path("eval") / suite_name)
    out = out.absolute()
    policy, ckpt_step = load_eval_policy(cfg, checkpoint, step)
    temp = val_temperature(cfg) if temperature is None else float(temperature)
    if temp < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {temp}")
    if trials is None and cfg.env.train.simulator_type != "libero":
        trials = cfg.data.val_num_trials_per_task or 50
    video_dir = str(out / "videos") if video else None
    with SimSession(cfg, policy, video_dir=video_dir) as sim:
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
    report = write_eval_report(episodes, out, name=name, title=f"{checkpoint.name}{at}: {how} success on {suite_name}")
    return EvalResult(report, episodes, out, ckpt_step)
