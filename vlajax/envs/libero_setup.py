"""Make the `libero` package (0.1.1, PyPI) importable and usable without interaction or network.

Why this module exists: at first import LIBERO asks on stdin for a dataset folder when
`$LIBERO_CONFIG_PATH/config.yaml` is missing, and it builds scenes from
`libero.libero._assets_path_cache` (else its package folder, else a Hugging Face download) -- it
never reads the `assets` key of config.yaml. `setup_libero()` writes the config file, points
LIBERO at an explicit assets folder (or a `.tar.xz` pack, extracted once into a cache), picks the
MuJoCo GL backend, and only then imports LIBERO. It never downloads anything: without assets it
raises `LiberoAssetsError` saying how to provide them.

Importing `libero.libero` and `libero.libero.envs` does not import torch; LIBERO's own
`libero.libero.benchmark` does (`import torch` at module level, and `torch.load` for init states),
so vlajax reads the suite tables and init states itself (see `load_suite_task_names`,
`load_init_states`).

LIBERO's results depend on the MuJoCo release: `check_mujoco_version` warns outside
`VALIDATED_MUJOCO` (the reasons are in its comment).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import logging
import os
import pickle
import re
import shutil
import sys
import tarfile
import tempfile
import warnings
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np

from vlajax.envs.subproc import set_default_gl_backend

log = logging.getLogger(__name__)

# MuJoCo releases (inclusive) on which LIBERO settles and renders as before the two changes below
# (tests/test_libero_simulator.py passes on 3.3.0, 3.3.1 and 3.3.2); pyproject.toml pins the upper
# end. 3.3.3 added texture colour spaces (default: from the file), and LIBERO's floor PNGs, which
# carry an sRGB chunk, render darker (LIBERO #88). 3.4.0 fixed the box-box distance, and objects
# built from boxes settle differently in reset (libero_spatial task 5's bowl ends on the ramekin's
# rim, RLinf #1460: a checkpoint's success on that task 98% -> 12%).
VALIDATED_MUJOCO = ("3.3.0", "3.3.2")

ASSETS_ENV = "VLAJAX_LIBERO_ASSETS"  # folder with LIBERO's assets, or a .tar.xz pack of them
CACHE_ENV = "VLAJAX_LIBERO_CACHE"  # where config.yaml and extracted packs live
# Files every LIBERO scene needs; used to recognise an assets folder.
_MARKERS = ("scenes", "stable_scanned_objects", "articulated_objects")
_PACK_SUFFIXES = (".tar.xz", ".txz", ".tar.gz", ".tgz", ".tar")


class LiberoAssetsError(FileNotFoundError):
    """LIBERO's scene assets were not found; the message says how to provide them."""


class MujocoVersionWarning(UserWarning):
    """LIBERO runs on a MuJoCo release outside `VALIDATED_MUJOCO`."""


def cache_dir() -> Path:
    """vlajax's LIBERO folder: `$VLAJAX_LIBERO_CACHE`, else `$XDG_CACHE_HOME/vlajax/libero`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vlajax" / "libero"


def _is_assets_dir(path: Path) -> bool:
    return path.is_dir() and all((path / m).is_dir() for m in _MARKERS)


def _find_assets_dir(root: Path) -> Path | None:
    """`root` itself, `root/assets`, or `root/*/assets` (the pack's `libero_pack/assets`)."""
    for cand in (root, root / "assets", *sorted(root.glob("*/assets"))):
        if _is_assets_dir(cand):
            return cand
    return None


def _how_to() -> str:
    return (
        f"Provide LIBERO's scene assets: pass assets_dir=... or set {ASSETS_ENV} to either the "
        "`assets` folder of a LIBERO source checkout (LIBERO/libero/libero/assets) or a .tar.xz pack "
        "of it (e.g. libero-assets.tar.xz, which holds libero_pack/assets). vlajax never downloads "
        "assets."
    )


def _extract_pack(pack: Path) -> Path:
    """Extract a tar pack once into the cache (keyed by path, size and mtime); return its assets dir."""
    st = pack.stat()
    key = hashlib.sha256(f"{pack.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    dest = cache_dir() / f"assets-{key}"
    if dest.is_dir():
        found = _find_assets_dir(dest)
        if found is not None:
            return found
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Extract into a private temp folder and rename atomically, so concurrent workers never see a
    # half-extracted tree; the loser of a rename race just drops its copy.
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    try:
        with tarfile.open(pack) as tar:
            tar.extractall(tmp, filter="data")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found = _find_assets_dir(dest)
    if found is None:
        raise LiberoAssetsError(
            f"the pack {pack} holds no LIBERO assets folder (expected a folder with "
            f"{', '.join(_MARKERS)}). {_how_to()}"
        )
    return found


def resolve_assets_dir(assets: str | os.PathLike | None = None) -> Path:
    """The LIBERO assets folder from `assets`, else `$VLAJAX_LIBERO_ASSETS`; packs are extracted."""
    source = assets if assets is not None else os.environ.get(ASSETS_ENV)
    if not source:
        raise LiberoAssetsError(f"no LIBERO assets given. {_how_to()}")
    path = Path(source).expanduser()
    if not path.exists():
        raise LiberoAssetsError(f"LIBERO assets path {path} does not exist. {_how_to()}")
    if path.is_file():
        if not path.name.endswith(_PACK_SUFFIXES):
            raise LiberoAssetsError(f"{path} is a file but not a tar pack ({', '.join(_PACK_SUFFIXES)}).")
        return _extract_pack(path)
    found = _find_assets_dir(path)
    if found is None:
        raise LiberoAssetsError(
            f"{path} is not a LIBERO assets folder (it needs the sub-folders {', '.join(_MARKERS)}). "
            f"{_how_to()}"
        )
    return found


def _package_dir() -> Path:
    spec = importlib.util.find_spec("libero")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the `libero` package is not installed: pip install 'vlajax[libero]'")
    return Path(list(spec.submodule_search_locations)[0]) / "libero"


def ensure_config() -> Path:
    """Make sure `$LIBERO_CONFIG_PATH/config.yaml` exists, so importing LIBERO asks nothing.

    A user's own LIBERO_CONFIG_PATH is respected (a missing config.yaml is written there);
    otherwise vlajax uses its own folder, leaving ~/.libero alone."""
    cfg_dir = Path(os.environ.setdefault("LIBERO_CONFIG_PATH", str(cache_dir()))).expanduser()
    cfg = cfg_dir / "config.yaml"
    if not cfg.exists():
        import yaml  # PyYAML: a dependency of LIBERO itself

        root = _package_dir()
        cfg_dir.mkdir(parents=True, exist_ok=True)
        paths = {
            "benchmark_root": root,
            "bddl_files": root / "bddl_files",
            "init_states": root / "init_files",
            "datasets": cfg_dir / "datasets",
            "assets": root / "assets",  # not read by LIBERO 0.1.1's envs; see module docstring
        }
        tmp = cfg.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(yaml.safe_dump({k: str(v) for k, v in paths.items()}))
        os.replace(tmp, cfg)
    return cfg


def set_gl_backend(mujoco_gl: str | None = None) -> str | None:
    """Choose MuJoCo's GL backend before robosuite is imported: `mujoco_gl` if given, else the
    user's MUJOCO_GL, else EGL (OSMesa where no libEGL exists; `subproc.set_default_gl_backend`)."""
    current = os.environ.get("MUJOCO_GL")
    if mujoco_gl and mujoco_gl != current:
        if "robosuite" in sys.modules or "mujoco" in sys.modules:
            raise RuntimeError(
                f"MUJOCO_GL={mujoco_gl!r} requested, but mujoco/robosuite were already imported with "
                f"MUJOCO_GL={current!r}; set it before the first import (or in the worker process)."
            )
        os.environ["MUJOCO_GL"] = mujoco_gl
    backend = set_default_gl_backend()
    if backend in ("egl", "osmesa"):  # robosuite's EGL context insists PyOpenGL agrees
        os.environ.setdefault("PYOPENGL_PLATFORM", backend)
    return backend


def _release(version: str) -> tuple[int, int, int]:
    found = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if found is None:
        raise ValueError(f"not a MuJoCo version: {version!r}")
    return tuple(int(x) for x in found.groups())


def installed_mujoco_version() -> str:
    """The imported mujoco's version, else the installed distribution's (without importing it: the
    GL backend must be chosen before the first import)."""
    if "mujoco" in sys.modules:
        return sys.modules["mujoco"].__version__
    return metadata.version("mujoco")


def check_mujoco_version(version: str | None = None, stacklevel: int = 2) -> str | None:
    """Warn (`MujocoVersionWarning` and a log warning) when `version` (default: the installed
    mujoco) is outside `VALIDATED_MUJOCO`; returns the message, or None inside the range."""
    version = version or installed_mujoco_version()
    low, high = VALIDATED_MUJOCO
    if _release(low) <= _release(version) <= _release(high):
        return None
    msg = (
        f"LIBERO is running on mujoco {version}, outside the validated range {low}..{high}; "
        "checkpoints trained on LIBERO data may score below their published success rates. "
        "(1) Init states settle differently during reset (from 3.4.0: libero_spatial task 5's black "
        "bowl ends on the ramekin's rim instead of resting on it, and libero_10's living-room objects "
        "are thrown off the table). (2) Floors render darker than in the training images (from 3.3.3, "
        "which decodes LIBERO's floor textures as sRGB). "
        f"Install the validated simulator: pip install 'mujoco=={high}' (vlajax pins it)."
    )
    warnings.warn(msg, MujocoVersionWarning, stacklevel=stacklevel)
    log.warning(msg)
    return msg


@functools.cache
def warn_mujoco_version_once() -> str | None:
    """`check_mujoco_version()` for the installed mujoco, once per process (reported at the caller's caller)."""
    return check_mujoco_version(stacklevel=4)


def setup_libero(assets: str | os.PathLike | None = None, mujoco_gl: str | None = None) -> Path:
    """Prepare and import LIBERO; returns the assets folder LIBERO will build scenes from."""
    assets_dir = resolve_assets_dir(assets)
    set_gl_backend(mujoco_gl)
    ensure_config()
    import libero.libero as libero_pkg

    # LIBERO 0.1.1 resolves every scene/object XML through get_assets_path(), which returns this
    # cache when it exists; setting it before the first env is built avoids the hub download path.
    libero_pkg._assets_path_cache = str(assets_dir)
    return assets_dir


def load_suite_task_names() -> dict[str, list[str]]:
    """LIBERO's suite -> task-name table, read without importing `libero.libero.benchmark` (torch).

    Task order: LIBERO's benchmarks use `task_orders[0]`, the identity, for every suite."""
    path = _package_dir() / "benchmark" / "libero_suite_task_map.py"
    spec = importlib.util.spec_from_file_location("_vlajax_libero_task_map", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {k: list(v) for k, v in module.libero_task_map.items()}


def language_from_task_name(name: str) -> str:
    """The instruction LIBERO's benchmark gives a task (from its name, not its BDDL `:language`,
    which differs for 29 of 130 tasks; OpenVLA-OFT and SimpleVLA use this one)."""
    if name[0].isupper():  # LIBERO-90/10 names carry a scene prefix, e.g. KITCHEN_SCENE10_...
        start = name.find("SCENE") + (8 if "SCENE10" in name else 7)
        name = name[start:]
    return " ".join(name.split("_"))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """LIBERO's `.pruned_init` files are torch.save zips holding one pickled numpy array."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a LIBERO init-states file")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("torch tensors in a LIBERO init-states file are not supported")


def load_init_states(path: str | os.PathLike) -> np.ndarray:
    """(num_states, state_dim) float64 flattened MuJoCo states of one task (no torch needed)."""
    with zipfile.ZipFile(path) as zf:
        (pkl,) = [n for n in zf.namelist() if n.endswith("data.pkl")]
        states = _NumpyOnlyUnpickler(io.BytesIO(zf.read(pkl))).load()
    return np.asarray(states)
