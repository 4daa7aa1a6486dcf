"""openpi's checkpoint layout, read and written as openpi does it:

    <dir>/params/                            orbax PyTree checkpoint of {"params": tree}
    <dir>/assets/<asset_id>/norm_stats.json  {"norm_stats": {"state": {...}, "actions": {...}}}

(openpi `models/model.py:restore_params`, `training/checkpoints.py`, `shared/normalize.py`). A tree
saved from an `nnx.State` during openpi training has every leaf under a trailing "value" key: it is
read as the pure dict openpi itself returns. Arrays keep their dtype (openpi's released π0 weights
are bfloat16)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

__all__ = ["asset_ids", "read_norm_stats", "read_params", "write_checkpoint"]


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: dict[tuple, object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def read_params(path: str | Path) -> dict:
    """The `params` tree of `<path>/params` (or of `path` itself if it is the params directory),
    as numpy arrays in their stored dtype."""
    path = Path(path).absolute()
    params_dir = path / "params" if (path / "params").is_dir() else path
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{path} has no params/ directory (an openpi checkpoint keeps its weights there)")
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(params_dir)
        meta = getattr(meta, "item_metadata", meta)  # orbax >= 0.11: StepMetadata -> TreeMetadata
        tree = dict(getattr(meta, "tree", meta))
        if "params" not in tree:
            raise KeyError(f"{params_dir} holds no 'params' item (has {sorted(tree)})")
        item = {"params": tree["params"]}
        flat_meta = _flatten(tree["params"])
        restore_args = {"params": _unflatten({k: ocp.RestoreArgs(restore_type=np.ndarray) for k in flat_meta})}
        params = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args))["params"]
    flat = _flatten(params)
    if flat and all(k[-1] == "value" for k in flat):
        flat = {k[:-1]: v for k, v in flat.items()}
    return _unflatten({k: np.asarray(v) for k, v in flat.items()})


def asset_ids(path: str | Path) -> list[str]:
    """The asset ids with norm stats under `<path>/assets` (openpi's ids may hold a "/":
    `physical-intelligence/libero`)."""
    assets = Path(path) / "assets"
    return sorted(str(f.parent.relative_to(assets)) for f in assets.rglob("norm_stats.json")) if assets.is_dir() else []


def read_norm_stats(path: str | Path, asset_id: str | None = None) -> dict[str, dict[str, np.ndarray]]:
    """{"state": {"mean", "std", "q01", "q99"}, "actions": {...}} of `<path>/assets/<asset_id>/norm_stats.json`
    (`asset_id` None: the only one there)."""
    assets = Path(path) / "assets"
    ids = asset_ids(path)
    if asset_id is None:
        if len(ids) != 1:
            raise FileNotFoundError(f"{assets}: name the asset id of the norm stats to use (found {', '.join(ids) or 'none'})")
        asset_id = ids[0]
    f = assets / asset_id / "norm_stats.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f} does not exist (asset ids there: {', '.join(ids) or 'none'})")
    raw = json.loads(f.read_text())["norm_stats"]
    return {k: {s: np.asarray(v, np.float32) for s, v in stats.items() if v is not None} for k, stats in raw.items()}


def write_checkpoint(path: str | Path, params: dict, norm_stats: dict[str, dict] | None = None) -> None:
    """Write `params` (and `norm_stats` per asset id) in openpi's layout at `path`."""
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(path / "params", {"params": params})
    for asset_id, stats in (norm_stats or {}).items():
        d = path / "assets" / asset_id
        d.mkdir(parents=True, exist_ok=True)
        doc = {"norm_stats": {k: {s: np.asarray(v).tolist() for s, v in st.items()} for k, st in stats.items()}}
        (d / "norm_stats.json").write_text(json.dumps(doc, indent=2))
