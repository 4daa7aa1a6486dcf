"""Image preprocessing: TF crop_and_resize formula (exact), lanczos resize vs Pillow, Prismatic
pixel_values layout, batching/flip/jit, JPEG round-trip and proprio normalisation.

TensorFlow itself is not a dependency; the TF comparison numbers are measured offline (see the
report / README); here the crop is checked against a direct numpy transcription of TF's CPU
kernel, and the resize against Pillow on smooth images (Pillow rounds to uint8 between its
horizontal and vertical passes, so on pixel noise it is not a usable reference)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vlajax.model.preprocess import (DINO_MEAN, DINO_STD, center_crop_resize, crop_sample_coords, jpeg_roundtrip,
                                     normalize_proprio, preprocess_images, resize_lanczos)

RNG = np.random.default_rng(0)


def _smooth(n: int, size: int = 256) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        chans = []
        for _ in range(3):
            f, ph = RNG.uniform(0.5, 4, (3, 2)), RNG.uniform(0, 6.3, 3)
            chans.append(127.5 + 40 * sum(np.sin(2 * np.pi * (f[i, 0] * yy + f[i, 1] * xx) + ph[i]) for i in range(3)))
        out.append(np.stack(chans, -1))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _tf_crop_and_resize_numpy(img_u8: np.ndarray, crop_area: float, out: int) -> np.ndarray:
    """Direct numpy transcription of OFT's center_crop with TF's CPU crop_and_resize kernel, in
    float32 and in the kernel's operation order: convert_image_dtype, box from sqrt(area),
    in_y = y1*(H-1) + y*(y2-y1)*(H-1)/(out-1), floor/ceil/lerp (x first, then y), clip, convert
    back with saturate (scale by 255.5, truncate)."""
    f32 = np.float32
    h, w, _ = img_u8.shape
    image = img_u8.astype(f32) * f32(1.0 / 255.0)
    s = np.clip(np.sqrt(f32(crop_area)), f32(0), f32(1))
    y1 = x1 = (f32(1) - s) / f32(2)
    y2 = x2 = y1 + s
    hs = f32(f32(y2 - y1) * f32(h - 1)) / f32(out - 1)
    ws = f32(f32(x2 - x1) * f32(w - 1)) / f32(out - 1)
    in_y = f32(y1 * f32(h - 1)) + np.arange(out, dtype=f32) * hs
    in_x = f32(x1 * f32(w - 1)) + np.arange(out, dtype=f32) * ws
    ty, by = np.floor(in_y).astype(int), np.ceil(in_y).astype(int)
    lx, rx = np.floor(in_x).astype(int), np.ceil(in_x).astype(int)
    yl = (in_y - ty.astype(f32))[:, None, None]
    xl = (in_x - lx.astype(f32))[None, :, None]
    tl, tr = image[ty][:, lx], image[ty][:, rx]
    bl, br = image[by][:, lx], image[by][:, rx]
    top = tl + (tr - tl) * xl
    bot = bl + (br - bl) * xl
    res = top + (bot - top) * yl
    assert res.dtype == f32
    return np.minimum(np.clip(res, 0, 1) * f32(255.5), f32(255)).astype(np.uint8)


@pytest.mark.parametrize("in_size", [224, 256])
def test_center_crop_matches_tf_formula_exactly(in_size):
    imgs = RNG.integers(0, 256, (4, in_size, in_size, 3), dtype=np.uint8)
    ours = np.asarray(center_crop_resize(jnp.asarray(imgs), 0.9, 224)).astype(np.uint8)
    for k in range(4):
        np.testing.assert_array_equal(ours[k], _tf_crop_and_resize_numpy(imgs[k], 0.9, 224))


def test_crop_coords_are_align_corners():
    lo, hi, frac = crop_sample_coords(224, 224, 0.9)
    pos = lo + frac
    side = np.sqrt(np.float32(0.9))
    np.testing.assert_allclose(pos[[0, -1]], [(1 - side) / 2 * 223, (1 + side) / 2 * 223], atol=2e-4)
    assert np.all(np.diff(pos) > 0) and np.all((hi - lo) <= 1)
    with pytest.raises(ValueError, match="crop_area"):
        crop_sample_coords(224, 224, 1.2)


def test_resize_close_to_pillow_lanczos_on_smooth_images():
    imgs = _smooth(3)
    ours = np.asarray(resize_lanczos(jnp.asarray(imgs), 224)).astype(np.int32)
    pil = np.stack([np.asarray(Image.fromarray(im).resize((224, 224), Image.LANCZOS)) for im in imgs]).astype(np.int32)
    diff = np.abs(ours - pil)
    assert diff.max() <= 2 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_pixel_values_layout_and_normalisation():
    imgs = RNG.integers(0, 256, (2, 2, 256, 256, 3), dtype=np.uint8)  # (B, n_img, H, W, 3)
    pv = np.asarray(preprocess_images(jnp.asarray(imgs)))
    assert pv.shape == (2, 12, 224, 224) and pv.dtype == np.float32
    mean, std = np.float32(DINO_MEAN)[:, None, None], np.float32(DINO_STD)[:, None, None]
    for b in range(2):
        for k in range(2):
            u8 = center_crop_resize(resize_lanczos(jnp.asarray(imgs[b, k][None, ::-1, ::-1]), 224))
            x = np.asarray(u8)[0].transpose(2, 0, 1) / np.float32(255)  # CHW in [0, 1], op by op
            dino, siglip = pv[b, 6 * k:6 * k + 3], pv[b, 6 * k + 3:6 * k + 6]
            # jit's fused crop may move a pixel in a million by one uint8 level (FMA, see docstring)
            off = np.abs(siglip - (2 * x - 1)) > 1e-6
            assert off.mean() < 1e-4 and np.abs(siglip - (2 * x - 1)).max() <= 2 / 255 + 1e-6
            # both blocks come from the same uint8 image: SigLIP = 2 u/255 - 1, DINOv2 = (u/255 - mean) / std
            u = (siglip + 1) / 2
            np.testing.assert_allclose(u * 255, np.round(u * 255), atol=1e-4)
            np.testing.assert_allclose(dino, (u - mean) / std, atol=1e-5)


def test_single_image_batch_flip_and_options():
    imgs = RNG.integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    pv = np.asarray(preprocess_images(jnp.asarray(imgs)))
    assert pv.shape == (3, 6, 224, 224)
    # the batch is processed per sample, identically to one-at-a-time
    np.testing.assert_array_equal(pv[1:2], np.asarray(preprocess_images(jnp.asarray(imgs[1:2]))))
    # flip=True is the 180-degree rotation of the input
    np.testing.assert_array_equal(
        pv, np.asarray(preprocess_images(jnp.asarray(imgs[:, ::-1, ::-1]), flip=False)))
    # without the crop: the normalised lanczos resize
    nocrop = np.asarray(preprocess_images(jnp.asarray(imgs), flip=False, center_crop=False, resize_to=128))
    ref = np.asarray(resize_lanczos(jnp.asarray(imgs), 128)).transpose(0, 3, 1, 2) / np.float32(255)
    assert nocrop.shape == (3, 6, 128, 128)
    np.testing.assert_allclose(nocrop[:, 3:], 2 * ref - 1, atol=1e-6)
    # jit-compiled with a static option, traced inside a caller's jit
    outer = jax.jit(lambda x: preprocess_images(x, center_crop=False))
    np.testing.assert_array_equal(np.asarray(outer(jnp.asarray(imgs))),
                                  np.asarray(preprocess_images(jnp.asarray(imgs), center_crop=False)))


def test_bad_inputs_name_the_problem():
    with pytest.raises(TypeError, match="must be uint8"):
        preprocess_images(jnp.zeros((1, 64, 64, 3), jnp.float32))
    with pytest.raises(ValueError, match=r"\(B, n_img, H, W, 3\)"):
        preprocess_images(jnp.zeros((1, 64, 64, 4), jnp.uint8))


def test_jpeg_roundtrip():
    imgs = _smooth(2, 64)[None]  # (1, 2, 64, 64, 3): any leading shape
    out = jpeg_roundtrip(imgs)
    assert out.shape == imgs.shape and out.dtype == np.uint8
    err95 = np.abs(out.astype(int) - imgs).mean()
    err30 = np.abs(jpeg_roundtrip(imgs, quality=30).astype(int) - imgs).mean()
    assert 0 < err95 < 5 and err95 < err30  # lossy, small at q=95, and quality matters
    pil = jpeg_roundtrip(imgs, decoder="pillow")
    assert np.abs(pil.astype(int) - out).max() <= 16  # islow vs ifast IDCT (equal when no simplejpeg)
    with pytest.raises(ValueError, match="uint8"):
        jpeg_roundtrip(imgs.astype(np.float32))


def test_normalize_proprio():
    q01, q99 = np.array([-1.0, 0.0, 2.0]), np.array([1.0, 4.0, 2.5])
    p = np.array([[0.0, 1.0, 3.0], [-2.0, 4.0, 2.25]])
    got = np.asarray(normalize_proprio(p, q01, q99))
    want = np.clip(2 * (p - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got[0, 2] == 1.0 and got[1, 0] == -1.0  # clipped
    masked = np.asarray(normalize_proprio(p, q01, q99, mask=[True, False, True]))
    np.testing.assert_allclose(masked[:, 1], np.clip(p[:, 1], -1, 1))
    with pytest.raises(ValueError, match="proprio"):
        normalize_proprio(p, q01[:2], q99[:2])
