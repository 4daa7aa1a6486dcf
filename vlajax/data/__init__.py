"""Demonstration data (LIBERO's HDF5 layout): numpy and h5py only, no jax, so data tools stay light."""

from vlajax.data.libero_hdf5 import (
    CAMERA_KEYS,
    DatasetError,
    DemoWriter,
    Episode,
    action_statistics,
    demo_path,
    proprio_statistics,
    read_dataset,
    read_episodes,
)

__all__ = [
    "CAMERA_KEYS",
    "DatasetError",
    "DemoWriter",
    "Episode",
    "action_statistics",
    "demo_path",
    "proprio_statistics",
    "read_dataset",
    "read_episodes",
]
