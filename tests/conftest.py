"""Helpers shared by the test files (pytest loads this first)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
