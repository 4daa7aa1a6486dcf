"""Helpers shared by the test files (pytest loads this first; tests import them from `tests.conftest`,
never from another test module). Only the standard library and pytest at the top: worker processes
import this module too, so heavy imports stay inside the helpers."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable

import pytest

REPO = Path(__file__).resolve().parents[1]

# One persistent JAX compilation cache for the whole test session, in-process and for the `vlajax`
# processes tests start (the CLI's default cache is the user's): the tests build the same small
# programs over and over, and a cache hit runs the executable the compile would have made. Set before
# jax is imported (it reads these at import). Tests that count compiles set their own directory.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", f"/tmp/vlajax-test-jax-cache-{os.getuid()}")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# -- short training runs ----------------------------------------------------------------------------
# `key=value` overrides that make any run config a tiny one: small images and episodes, 2 GRPO groups
# of 4 per step, no validation, a checkpoint every step, jsonl metrics only. Files add their own on top
# (a later override of the same key wins).
TINY_RUN = [
    "actor_rollout_ref.model.image_size=56", "actor_rollout_ref.rollout.n=4", "data.train_batch_size=2",
    "env.train.num_envs=4", "env.train.max_episode_steps=16", "env.train.init_params.camera_heights=32",
    "env.train.init_params.camera_widths=32", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16", "data.val_num_trials_per_task=1",
    "trainer.test_freq=-1", "trainer.val_before_train=false", "trainer.save_freq=1", "data.filter_accuracy=false",
    "trainer.logger=[jsonl]",
]
# `libero_grpo` on real LIBERO on CPU: the small preset in float32, no GPUs, groups of 2 on 2 envs, 64 px.
LIBERO_SMALL_RUN = TINY_RUN + [
    "actor_rollout_ref.model.path=preset:small", "actor_rollout_ref.model.compute_dtype=float32",
    "actor_rollout_ref.model.enable_gradient_checkpointing=false", "trainer.n_env_gpus_per_node=0",
    "trainer.n_rollout_gpus_per_node=0", "env.train.num_envs=2", "actor_rollout_ref.rollout.n=2",
    "env.train.init_params.camera_heights=64", "env.train.init_params.camera_widths=64",
    "actor_rollout_ref.actor.ppo_mini_batch_size=4", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
]


# -- LIBERO -----------------------------------------------------------------------------------------
def libero_pack() -> str:
    """LIBERO's offline asset pack: $VLAJAX_LIBERO_ASSETS, else ../shared/libero-assets.tar.xz beside the
    repo (as CI lays it out); skips the test when there is none."""
    from vlajax.envs import libero_setup

    pack = os.environ.get(libero_setup.ASSETS_ENV)
    if not pack:
        shared = REPO.parent / "shared" / "libero-assets.tar.xz"
        pack = str(shared) if shared.exists() else None
    if pack is None:
        pytest.skip(f"no LIBERO asset pack: set {libero_setup.ASSETS_ENV} or put shared/ beside the repo")
    return pack


@pytest.fixture(scope="session")
def assets() -> str:
    """The extracted LIBERO assets folder (the pack extracted once, LIBERO's config written)."""
    from vlajax.envs import libero_setup

    return str(libero_setup.setup_libero(libero_pack()))


# -- files and data ---------------------------------------------------------------------------------
def final_params(run_dir) -> tuple[int, dict]:
    """A run directory's latest checkpoint: (step, its parameters as numpy)."""
    import jax
    import numpy as np

    from vlajax.rl.checkpoint import CheckpointManager

    with CheckpointManager(Path(run_dir) / "checkpoints") as ck:
        r = ck.restore(ck.latest_step())
    return r.step, jax.tree.map(np.asarray, r.params)


def same_params(a: dict, b: dict) -> bool:
    """Bit-identical parameter trees."""
    import jax
    import numpy as np

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def csv_rows(path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header (evaluation tables), as dicts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


DEMO_TASK, DEMO_INSTRUCTION = "pick_up_the_bowl", "pick up the bowl"


def two_proportion_z(k1: int, n1: int, k2: int, n2: int) -> float:
    """z statistic of p2 > p1 (pooled two-proportion test): "success rose" in the learning tests."""
    p = (k1 + k2) / (n1 + n2)
    return (k2 / n2 - k1 / n1) / max((p * (1 - p) * (1 / n1 + 1 / n2)) ** 0.5, 1e-9)


def successes(history) -> tuple[int, int]:
    """(successes, episodes) of the sampled rollouts over a `TrainResult.history` slice."""
    return int(sum(m["train/successes"] for m in history)), int(sum(m["train/episodes"] for m in history))


def success_rise(run_dir, res, window: int = 10) -> SimpleNamespace:
    """What the learning tests judge in a finished `train` run: validation success at step 0
    (metrics.jsonl) and at the end (`final_eval`, the same n_val states) with the z of the rise, and
    the sampled rollouts' (successes, episodes) in the first and last `window` steps with theirs."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    before = next(r["val/success_rate"] for r in rows if r["step"] == 0 and "val/success_rate" in r)
    n_val, after = len(res.final_eval["episodes"]), res.final_eval["success_rate"]
    first, last = successes(res.history[:window]), successes(res.history[-window:])
    return SimpleNamespace(before=before, after=after, n_val=n_val,
                           z_val=two_proportion_z(round(before * n_val), n_val, round(after * n_val), n_val),
                           first=first, last=last, z_train=two_proportion_z(*first, *last))


def make_episode(t: int = 5, seed: int = 0, state_id: int = 3, hw: int = 8):
    """A random LIBERO-layout demonstration `vlajax.data.Episode` of DEMO_TASK: t steps, both cameras
    at hw x hw (demo files to write and read without a simulator)."""
    import numpy as np

    from vlajax.data import Episode

    rng = np.random.default_rng(seed)
    return Episode(
        images={c: rng.integers(0, 256, (t, hw, hw, 3), np.uint8) for c in ("agentview", "robot0_eye_in_hand")},
        proprio=rng.normal(size=(t, 8)).astype(np.float32),
        actions=rng.uniform(-1, 1, (t, 7)).astype(np.float32),
        instruction=DEMO_INSTRUCTION, task=DEMO_TASK, state_id=state_id,
        states=rng.normal(size=(t, 11)), joint_states=rng.normal(size=(t, 7)),
        eef_quat=rng.normal(size=(t, 4)),
    )


# -- processes --------------------------------------------------------------------------------------
def sentencepiece_model(path, vocab_size: int = 36) -> Path:
    """A tiny SentencePiece model trained here on robot instructions (a stand-in for PaliGemma's: the
    tests need the format, not the vocabulary); written to `path`."""
    import io

    import sentencepiece

    lines = [f"{verb} the {colour} {thing} {where}" for verb in ("pick up", "put", "move", "open", "close")
             for colour in ("red", "green", "blue", "black", "white") for thing in ("bowl", "mug", "block", "drawer")
             for where in ("on the plate", "in the basket", "to the left", "near the stove")]
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                             model_type="unigram", bos_id=2, eos_id=1, pad_id=0, unk_id=3,
                                             user_defined_symbols=["\n"], minloglevel=2)
    Path(path).write_bytes(buf.getvalue())
    return Path(path)


PI0_FIXTURE = REPO / "tests" / "data" / "pi0_openpi"


def openpi_checkpoint(path, asset_id: str, *, state_dim: int = 8, action_dim: int = 7, seed: int = 0) -> Path:
    """The tiny π0 that openpi's code wrote (tests/data/pi0_openpi/tiny_checkpoint: params only),
    with made-up z-score norm stats under `asset_id`, at `path` in openpi's layout."""
    import numpy as np

    from vlajax.model.pi0.checkpoint import read_params, write_checkpoint

    rng = np.random.default_rng(seed)
    stats = {"state": {"mean": rng.normal(0, 0.3, state_dim), "std": rng.uniform(0.2, 1.0, state_dim)},
             "actions": {"mean": rng.normal(0, 0.1, action_dim), "std": rng.uniform(0.2, 0.5, action_dim)}}
    write_checkpoint(path, read_params(PI0_FIXTURE / "tiny_checkpoint"), {asset_id: stats})
    return Path(path)


def free_port() -> int:
    """A TCP port nobody listens on right now (for a coordinator or Ray head started next)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """Process `pid` exists and is not a zombie (an exited child not yet reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_gone(pids: Iterable[int], timeout_s: float = 20.0) -> list[int]:
    """Wait up to `timeout_s` for all of `pids` to end; the ones still alive then."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


def pids_where(pred: Callable[[int], bool]) -> list[int]:
    """Live processes other than this one for which `pred(pid)` holds (an OSError in `pred`: skipped)."""
    out = []
    for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()):
        try:
            if pid != os.getpid() and pred(pid) and alive(pid):
                out.append(pid)
        except OSError:
            pass
    return out


def kill_sessions(sids: Iterable[int]) -> None:
    """SIGKILL every live process in these sessions: what `start_new_session` children left behind."""
    sids = set(sids)
    for pid in pids_where(lambda pid: os.getsid(pid) in sids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Job:
    """The processes of one multi-process job on this machine (test_multihost's jax workers,
    test_multiprocess_train's `vlajax train`s). Process i runs `command(i, port)` -> (argv, env), `port`
    free for the job's coordinator, in its own session (killing it ends all it started, as a node going
    down), output in out/<tag>.<i>.log. `wait` has one deadline for all, counted from the start."""

    def __init__(self, ids: Iterable[int], command: Callable[[int, int], tuple[list[str], dict]], *, out: Path,
                 tag: str, cwd: Path | None = None):
        self.out, self.tag, self.port, self.started = out, tag, free_port(), time.monotonic()
        self.ids: list[int] = []
        self.procs: list[subprocess.Popen] = []
        try:
            for i in ids:
                argv, env = command(i, self.port)
                with open(self.log_path(i), "w") as f:
                    self.procs.append(subprocess.Popen(argv, cwd=cwd or out, env=env, stdout=f,
                                                       stderr=subprocess.STDOUT, start_new_session=True))
                self.ids.append(i)
        except BaseException:
            self.kill()
            raise

    def log_path(self, i: int) -> Path:
        return self.out / f"{self.tag}.{i}.log"

    def log(self, i: int) -> str:
        return self.log_path(i).read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {self.tag} process {i}:\n{self.log(i)[-3000:]}" for i in self.ids)

    def wait(self, timeout: float) -> dict[int, int]:
        """Exit codes by process id; fails the test (after killing them) if any still runs at `timeout`."""
        deadline = self.started + timeout
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        running = [i for i, p in zip(self.ids, self.procs) if p.poll() is None]
        if running:
            logs = self.logs()
            self.kill()
            pytest.fail(f"{self.tag}: processes {running} still running after {timeout} s\n{logs}")
        return {i: p.returncode for i, p in zip(self.ids, self.procs)}

    def kill_session(self, i: int) -> None:
        """End process i and everything it started (its session)."""
        p = self.procs[self.ids.index(i)]
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()

    def kill(self) -> None:
        for i in self.ids:
            self.kill_session(i)

    def leftovers(self) -> list[int]:
        """Pids still in any of the job's sessions."""
        sids = {p.pid for p in self.procs}
        return pids_where(lambda pid: os.getsid(pid) in sids)
