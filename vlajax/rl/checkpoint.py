"""Orbax checkpointing: params apart from the train state, async, keep-last-N, reshardable.

Layout of `<directory>/<step>/` (one orbax CheckpointManager, `ocp.args.Composite`):
  params/       StandardSave   the policy weights (what inference/eval loads alone)
  train_state/  StandardSave   opt_state, lr, step, ... (any pytree of arrays)
  data_state/   JsonSave       sampler position, group-id counter, ... (JSON)
  config/       JsonSave       run config / metadata (JSON)

Atomicity: orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` once
every item is on disk, so a crash mid-save leaves the last finished step as
`latest_step()`; leftover tmp dirs are ignored (and deleted when the manager opens).

Restoring onto another device count/mesh: pass targets whose leaves give the wanted
placement (jax.Array, jax.ShapeDtypeStruct with .sharding, or a bare Sharding — shapes
and dtypes then come from the checkpoint). With no target every array is restored fully
replicated on the local devices. nnx.State inputs are saved as pure dicts and restored
into a copy of the target State. Typed PRNG keys are saved as their raw key data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, Sharding

__all__ = ["CheckpointManager", "CheckpointMismatchError", "CheckpointReadError", "CheckpointWriteError", "Restored",
           "latest_committed_step", "locate_checkpoint"]

_ARRAY_ITEMS = ("params", "train_state")
_JSON_ITEMS = ("data_state", "config")


class CheckpointMismatchError(ValueError):
    """The checkpoint's tree structure or shapes differ from the restore target."""


class CheckpointReadError(OSError):
    """A checkpoint's files cannot be read (truncated or damaged); the message names the step, the
    tensor and the file, and the steps that remain."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a file size limit, a lost mount); the message names
    the step, the file and the reason, and the committed checkpoints that remain."""


# TensorStore's message for a tensor it cannot read or write, buried in an asyncio traceback
_TS_IO_ERROR = re.compile(r'([A-Z_]+): Error (reading|writing) "([^"]+)" in \w+ database at local file "([^"]+)"[^\n]*')


class _DropIOTracebacks(logging.Filter):
    """Drops orbax's logged tracebacks of a failed tensor read or write (the error raised names it), and
    once one failed, those of its threads that then die too (e.g. at exit, 'cannot schedule new futures')."""

    failed = False

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if _TS_IO_ERROR.search(record.getMessage() + " " + str(exc or "")):
            _DropIOTracebacks.failed = True
            return False
        return not (_DropIOTracebacks.failed and exc is not None)


def _quiet_failed_io() -> None:
    """orbax reads and writes tensors concurrently; after the first failure (a damaged file, a full disk)
    the others die with errors of their own, which Python prints as hundreds of lines ('Exception ignored
    in <coroutine ...>', 'Event loop is closed'), and orbax logs the failure with its traceback. From now
    on, those are not printed (the error raised names the first failure); anything else still is. Set up
    when a manager opens: they are printed before that error is raised."""
    absl = logging.getLogger("absl")
    if not any(isinstance(f, _DropIOTracebacks) for f in absl.filters):
        absl.addFilter(_DropIOTracebacks())
    hook = sys.unraisablehook
    if getattr(hook, "_vlajax_quiet", False):
        return

    def quiet(u):
        closed_loop = isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value)
        if not (closed_loop or "_read_array" in repr(u.object) or "orbax" in repr(u.object)
                or _TS_IO_ERROR.search(str(u.exc_value))):
            hook(u)

    quiet._vlajax_quiet = True
    sys.unraisablehook = quiet


def locate_checkpoint(path: str | os.PathLike) -> tuple[str, int | None]:
    """(checkpoint root, step or None = latest) for what a user may name as "a checkpoint": a run
    directory (holding `checkpoints/`), a checkpoint root (holding step folders), or one step folder
    (`<root>/<step>`)."""
    p = Path(path).expanduser().absolute()
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if (p / "checkpoints").is_dir():
        return str(p / "checkpoints"), None
    if p.name.isdigit() and (p / "params").is_dir():
        return str(p.parent), int(p.name)
    if any(c.name.isdigit() and c.is_dir() for c in p.iterdir()):
        return str(p), None
    raise FileNotFoundError(f"{p} holds no vlajax checkpoint: expected a run directory (with checkpoints/), "
                            f"a checkpoints/ folder of step folders, or one step folder (<...>/checkpoints/<step>)")


def latest_committed_step(directory: str | os.PathLike) -> int | None:
    """The latest finished step under a checkpoint root, None if it has none (or does not exist); reads
    only, so it can answer before a run starts anything, or after one stopped."""
    if not Path(directory).is_dir():
        return None
    return max(ocp.utils.checkpoint_steps(os.path.abspath(directory)), default=None)


@dataclasses.dataclass
class Restored:
    step: int
    params: Any = None
    train_state: Any = None
    data_state: dict | None = None
    config: dict | None = None


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _is_state(x) -> bool:
    return isinstance(x, nnx.State)


def _is_key(x) -> bool:
    dt = getattr(x, "dtype", None)
    return dt is not None and jnp.issubdtype(dt, jax.dtypes.prng_key)


def _path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _to_saveable(tree: Any) -> Any:
    if _is_state(tree):
        tree = nnx.to_pure_dict(tree)
    tree = jax.tree.map(lambda v: v.get_value() if _is_var(v) else v, tree, is_leaf=_is_var)

    def leaf(x):
        if _is_key(x):
            return jax.random.key_data(x)
        if isinstance(x, (int, float, bool, np.number)):
            return np.asarray(x)
        return x

    return jax.tree.map(leaf, tree)


def _item_meta(meta: Any, item: str) -> Any:
    try:
        return meta[item]
    except (KeyError, TypeError):
        return None


def _replicated() -> NamedSharding:
    return NamedSharding(Mesh(np.array(jax.devices()), ("all",)), P())


class CheckpointManager:
    """Thin wrapper over `ocp.CheckpointManager` for RL training state.

    Args:
      directory: root directory (created if missing).
      save_interval_steps: `save` writes only when step % K == 0 (unless force=True);
        the first save into an empty directory is always written (orbax policy).
      max_to_keep: keep the last N finished checkpoints.
      keep_period: additionally keep every checkpoint whose step % keep_period == 0.
      async_save: write in a background thread (`wait_until_finished` to block).
      read_only: open someone else's checkpoints (another run, a run still training): nothing is
        created, deleted or cleaned up there.
    """

    def __init__(
        self,
        directory: str,
        *,
        save_interval_steps: int = 1,
        max_to_keep: int | None = 3,
        keep_period: int | None = None,
        async_save: bool = True,
        read_only: bool = False,
    ):
        # orbax refuses relative paths; a library caller may still pass one
        self.directory = os.path.abspath(os.path.expanduser(str(directory)))
        if read_only and not Path(self.directory).is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
        if read_only:  # what orbax's read-only mode requires (it warns about each value it changes)
            options = ocp.CheckpointManagerOptions(save_interval_steps=0, max_to_keep=None, create=False,
                                                   cleanup_tmp_directories=False, read_only=True)
        else:
            options = ocp.CheckpointManagerOptions(
                save_interval_steps=save_interval_steps,
                max_to_keep=max_to_keep,
                keep_period=keep_period,
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
                create=True,
            )
        _quiet_failed_io()
        handlers = {k: ocp.StandardCheckpointHandler() for k in _ARRAY_ITEMS}
        handlers.update({k: ocp.JsonCheckpointHandler() for k in _JSON_ITEMS})
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # -- saving ---------------------------------------------------------------------------
    def save(
        self,
        step: int,
        params: Any,
        train_state: Any = None,
        *,
        data_state: dict | None = None,
        config: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Start saving `step` (async); returns False when skipped by the save interval."""
        args = dict(
            params=ocp.args.StandardSave(_to_saveable(params)),
            data_state=ocp.args.JsonSave(dict(data_state or {})),
            config=ocp.args.JsonSave(dict(config or {})),
        )
        if train_state is not None and jax.tree.leaves(train_state):  # orbax rejects empty items
            args["train_state"] = ocp.args.StandardSave(_to_saveable(train_state))
        with self._write_errors(step):  # also the previous (async) save's, which orbax raises here
            return self._mngr.save(step, args=ocp.args.Composite(**args), force=force)

    def wait_until_finished(self) -> None:
        with self._write_errors():
            self._mngr.wait_until_finished()

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def close(self) -> None:
        with self._write_errors():
            self._mngr.close()

    @contextlib.contextmanager
    def _write_errors(self, step: int | None = None):
        """A failed save as one `CheckpointWriteError` naming its step, file and reason; other errors
        pass unchanged."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - re-raised unless it is a failed write
            err = self._write_error(step, e)
            if err is e:
                raise
            _DropIOTracebacks.failed = True
            gc.collect()  # the failed writes' leftovers print now, quietly
            raise err from None

    _STEP_DIR = re.compile(r"/(\d+)(\.orbax-checkpoint-tmp[^/]*)?/")

    def _write_error(self, step: int | None, error: BaseException) -> BaseException:
        seen, todo = set(), [error]
        while todo:
            e = todo.pop()
            if e is None or id(e) in seen:
                continue
            seen.add(id(e))
            m = _TS_IO_ERROR.search(str(e))
            if m and m.group(2) == "writing":
                reason = re.search(r"(?:Failed to write|Failed writing)[^\n]*?: ([^:\[\n]+?)\s*(\[os_error_code|$)",
                                   m.group(0))
                what, where = (reason.group(1).strip() if reason else m.group(1)), m.group(4)
            elif isinstance(e, OSError) and e.errno is not None:
                what, where = e.strerror, e.filename or self.directory
            else:
                todo += [e.__cause__, e.__context__]
                continue
            s = self._STEP_DIR.search(str(where)[len(self.directory):] + "/")
            failed = int(s.group(1)) if s else step
            kept = self.all_steps()
            return CheckpointWriteError(
                f"checkpoint {self.directory} step {failed if failed is not None else '?'} could not be written: "
                f"{what} (writing {where}); the checkpoints committed before it stay "
                f"({kept or 'none'})")
        return error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- restoring ------------------------------------------------------------------------
    def saved_paths(self, step: int, item: str) -> set[str]:
        """The '/'-joined key paths of the arrays `item` ("params", "train_state") holds in checkpoint
        `step` (empty if it has no such item), e.g. to restore a checkpoint of an older layout."""
        meta = _item_meta(self._mngr.item_metadata(step), item)
        if meta is None:
            return set()
        return {_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(getattr(meta, "tree", meta))[0]}

    def restore(
        self,
        step: int | None = None,
        *,
        params: Any = None,
        train_state: Any = None,
        restore_params: bool = True,
        restore_train_state: bool = True,
    ) -> Restored:
        """Restore `step` (default: latest) onto the placement given by the targets.

        `params` / `train_state`: restore targets (see module docstring), None = replicated.
        Raises FileNotFoundError if there is no such checkpoint and CheckpointMismatchError
        naming the first differing keys/shapes if a target does not fit the checkpoint.
        """
        self._mngr.wait_until_finished()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
        elif step not in self._mngr.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}"
            )
        meta = self._mngr.item_metadata(step)
        wanted = {"params": (restore_params, params), "train_state": (restore_train_state, train_state)}
        args, post = {}, {}
        for item, (on, target) in wanted.items():
            if on and _item_meta(meta, item) is None:
                if target is not None:
                    raise CheckpointMismatchError(
                        f"checkpoint {self.directory} step {step} has no {item!r} item")
                continue
            if on:
                abstract, post[item] = self._abstract_target(step, item, _item_meta(meta, item), target)
                args[item] = ocp.args.StandardRestore(abstract)
        for item in _JSON_ITEMS:
            args[item] = ocp.args.JsonRestore()
        err = None
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # noqa: BLE001 - re-raised unless it is a damaged file
            err = self._read_error(step, e)
            if err is e:
                raise
        if err is not None:
            _DropIOTracebacks.failed = True
            gc.collect()  # the failed reads' leftovers print now, quietly, not at some later collection
            raise err
        res = Restored(step=step, data_state=out["data_state"], config=out["config"])
        for item, fix in post.items():
            setattr(res, item, fix(out[item]))
        return res

    _TS_READ_ERROR = re.compile(r'(OUT_OF_RANGE|DATA_LOSS|NOT_FOUND|FAILED_PRECONDITION|INVALID_ARGUMENT): '
                                r'Error reading "([^"]+)" in \w+ database at local file "([^"]+)"[^\n]*')

    def _read_error(self, step: int, error: BaseException) -> BaseException:
        """One clear error for a checkpoint whose files cannot be read (TensorStore's message is
        buried in an asyncio traceback); any other error is returned unchanged."""
        seen, todo = set(), [error]
        while todo:
            e = todo.pop()
            if e is None or id(e) in seen:
                continue
            seen.add(id(e))
            m = self._TS_READ_ERROR.search(str(e))
            if m:
                tensor = m.group(2).rsplit("/", 1)[0]
                others = [s for s in self.all_steps() if s != step]
                hint = (f"; restore an earlier step instead (have {others}, e.g. `vlajax eval RUN --step "
                        f"{max(others)}`, or delete {self.directory}/{step} so that trainer.resume=auto takes "
                        f"{max(others)})") if others else "; no other checkpoint is left"
                return CheckpointReadError(
                    f"checkpoint {self.directory} step {step} is damaged: tensor {tensor!r} cannot be read from "
                    f"{m.group(3)} ({m.group(1)}: {m.group(0).split(': ', 2)[-1]}){hint}")
            todo += [e.__cause__, e.__context__]
        return error

    def _abstract_target(self, step: int, item: str, meta: Any, target: Any):
        """(abstract tree for orbax, function mapping the restored tree to the output)."""
        meta = getattr(meta, "tree", meta)
        saved = {_path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(meta)[0]}
        state_target = target if _is_state(target) else None
        if target is None:  # replicated, shapes/dtypes from the checkpoint
            target = jax.tree.map(lambda m: _replicated(), meta)
        if state_target is not None:
            tgt = nnx.to_pure_dict(target)
        else:
            tgt = target
        tgt = jax.tree.map(lambda v: v.get_value() if _is_var(v) else v, tgt, is_leaf=_is_var)
        tgt = jax.tree.map(
            lambda x: np.asarray(x) if isinstance(x, (int, float, bool, np.number)) else x, tgt)
        is_shard = lambda x: isinstance(x, Sharding)  # noqa: E731
        flat = {_path_str(p): x for p, x in
                jax.tree_util.tree_flatten_with_path(tgt, is_leaf=is_shard)[0]}
        self._check(step, item, saved, flat)

        impls = {k: (jax.random.key_impl(x) if isinstance(x, jax.Array) else x.dtype._impl)
                 for k, x in flat.items() if _is_key(x)}

        def abstract(path, x):
            m = saved[_path_str(path)]
            if isinstance(x, Sharding):
                return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=x)
            if _is_key(x):  # stored as raw key data, re-wrapped in `finish`
                return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=_replicated())
            sharding = getattr(x, "sharding", None)
            if not isinstance(sharding, Sharding):
                sharding = _replicated()
            return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding)

        abs_tree = jax.tree_util.tree_map_with_path(abstract, tgt, is_leaf=is_shard)

        def finish(restored):
            if impls:
                restored = jax.tree_util.tree_map_with_path(
                    lambda p, a: jax.random.wrap_key_data(a, impl=impls[_path_str(p)])
                    if _path_str(p) in impls else a, restored)
            if state_target is not None:
                copy = jax.tree.map(lambda x: x, state_target)
                nnx.replace_by_pure_dict(copy, restored)
                return copy
            return restored

        return abs_tree, finish

    def _check(self, step: int, item: str, saved: dict, target: dict) -> None:
        missing = sorted(set(target) - set(saved))
        extra = sorted(set(saved) - set(target))
        problems = []
        if missing:
            problems.append(f"in the target but not in the checkpoint: {missing[:8]}")
        if extra:
            problems.append(f"in the checkpoint but not in the target: {extra[:8]}")
        for k in sorted(set(saved) & set(target)):
            x = target[k]
            if isinstance(x, Sharding):
                continue
            shape = tuple(x.shape)
            if _is_key(x):
                shape = tuple(jax.eval_shape(jax.random.key_data,
                                             jax.ShapeDtypeStruct(x.shape, x.dtype)).shape)
            if tuple(saved[k].shape) != shape:
                problems.append(f"shape of {k!r}: checkpoint {tuple(saved[k].shape)} vs target {shape}")
                if len(problems) > 8:
                    break
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory} step {step}, item {item!r} does not match the "
                "restore target (another model/state?): " + "; ".join(problems)
            )
