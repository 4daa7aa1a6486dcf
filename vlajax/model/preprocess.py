"""Image and proprio preprocessing for the OpenVLA-OFT / SimpleVLA policy, in JAX.

Reproduces the LIBERO rollout/eval pipeline of SimpleVLA-RL and OpenVLA-OFT (reference digest
`openvla_oft.md` §5) so that a JAX policy sees the same `pixel_values` as the PyTorch one:

1. rotate 180° (flip H and W): LIBERO renders upside-down and the training data were flipped;
2. resize to 224 with `tf.image.resize(method="lanczos3", antialias=True)`, then round, clip, uint8;
3. centre crop of 0.9 *area* (`tf.image.crop_and_resize`, box side sqrt(0.9)) resized back to 224
   bilinearly, on [0, 1] floats; then clip and `convert_image_dtype(uint8, saturate=True)`;
4. Prismatic processor: `/255`, then per backbone normalisation, stacked along channels, CHW:
   channels 0:3 DINOv2 (ImageNet mean/std), 3:6 SigLIP (mean = std = 0.5); with several images per
   sample the 6-channel blocks are concatenated in image order (OFT concatenates `pixel_values`
   along dim 1).

The reference ops are TensorFlow's. Step 2 uses `jax.image.resize`, whose `scale_and_translate`
kernel is the same algorithm as TF's `ScaleAndTranslate` op (same sample positions, kernel,
antialias kernel scaling and weight normalisation); only float summation order differs, so a
handful of pixels can round to a neighbouring uint8 value. Step 3 is TF's documented crop formula
evaluated exactly (sample coordinates computed in float32 in TF's order, then gathers and TF's lerp
expression), see `center_crop_resize`. Each uint8 quantisation of the reference is kept.
Measured against TF 2.21 (CPU) on 10 random-noise, smooth and blocky 256x256 frames: resize 4.7e-5
of the uint8 values off by 1 (float max |diff| 1.5e-4 before rounding); crop alone bit-exact;
jitted flip+resize+crop 2.8e-5 of the values off by 1, never more. Pillow's LANCZOS is not a
substitute: it rounds to uint8 between its two passes (max 39 levels off on noise).

Not reproduced inside JAX: the reference round-trips each frame through JPEG (quality 95) before the
resize (`tf.image.encode_jpeg` + `decode_image`, "as in the RLDS dataset builder"). JAX has no JPEG
codec; `jpeg_roundtrip` does it on the host (Pillow encode; simplejpeg decode, bit-exact with TF, or
Pillow decode, ~1 level off) and is off by default. Without it the policy sees artefact-free frames:
on natural-looking content the difference is ~1 uint8 level on average, on pixel noise far more.
"""

from __future__ import annotations

import io
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

DINO_MEAN = (0.485, 0.456, 0.406)
DINO_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
# tf.image.encode_jpeg's default quality; also the value the RLDS builder / OFT eval used.
TF_JPEG_QUALITY = 95


def resize_lanczos(images: jax.Array, size: int) -> jax.Array:
    """`tf.image.resize(x, (size, size), "lanczos3", antialias=True)` + round + clip to [0, 255].

    images: (N, H, W, C), any real dtype holding values in [0, 255].
    Returns float32 (N, size, size, C) holding integers 0..255 (the reference's uint8 values).

    TF's ScaleAndTranslate samples output pixel x at `(x + 0.5) / scale - 0.5` in input pixel
    coordinates with a Lanczos-3 kernel stretched by `max(1/scale, 1)` (antialias) and weights
    normalised to sum to 1; `jax.image.scale_and_translate` implements the same. Round is
    half-to-even in both TF and JAX.
    """
    n, _, _, c = images.shape
    out = jax.image.resize(images.astype(jnp.float32), (n, size, size, c), method="lanczos3",
                           antialias=True)
    return jnp.clip(jnp.round(out), 0.0, 255.0)


def crop_sample_coords(in_size: int, out_size: int, crop_area: float):
    """Sample coordinates of TF `crop_and_resize` for the centred box of OFT's `center_crop`.

    Box (normalised, as OFT builds it in float32): side `s = clip(sqrt(crop_area), 0, 1)`,
    `y1 = (1 - s) / 2`, `y2 = y1 + s` (same for x). TF's CPU kernel then samples output row i at

        scale = (y2 - y1) * (in_size - 1) / (out_size - 1)
        in_y(i) = y1 * (in_size - 1) + i * scale                       (all float32)

    i.e. align-corners style: row 0 sits exactly on y1*(H-1) and the last row on y2*(H-1). Bilinear
    weights come from `lo = floor(in_y)`, `hi = ceil(in_y)`, `frac = in_y - lo`.
    Returns numpy (lo int32 (out,), hi int32 (out,), frac float32 (out,)); the box is square so the
    same vectors serve rows and columns.
    """
    if not 0.0 < crop_area <= 1.0:
        raise ValueError(f"crop_area must be in (0, 1], got {crop_area}")
    if out_size < 2:
        raise ValueError(f"crop output size must be >= 2, got {out_size}")
    f32 = np.float32
    side = np.clip(np.sqrt(f32(crop_area)), f32(0), f32(1)).astype(f32)
    y1 = ((f32(1) - side) / f32(2)).astype(f32)
    y2 = (y1 + side).astype(f32)
    scale = f32(f32(y2 - y1) * f32(in_size - 1)) / f32(out_size - 1)
    i = np.arange(out_size, dtype=f32)
    in_y = (f32(y1 * f32(in_size - 1)) + i * f32(scale)).astype(f32)
    if in_y.min() < 0 or in_y.max() > in_size - 1:  # TF would fill with extrapolation_value
        raise ValueError(f"crop box samples outside the image: {in_y.min()}..{in_y.max()}")
    lo = np.floor(in_y).astype(np.int32)
    hi = np.ceil(in_y).astype(np.int32)
    frac = (in_y - lo.astype(f32)).astype(f32)
    return lo, hi, frac


def center_crop_resize(images: jax.Array, crop_area: float = 0.9, out_size: int = 224) -> jax.Array:
    """OFT's `center_crop`: `convert_image_dtype` -> `crop_and_resize` (bilinear) -> clip ->
    `convert_image_dtype(uint8, saturate=True)`.

    images: (N, H, W, C) holding integers 0..255 (uint8 or float). Returns float32
    (N, out_size, out_size, C) holding integers 0..255.

    Mirrors the TF CPU kernel term by term: `v = u8 * float32(1/255)`;
    `top = tl + (tr - tl) * fx`, `bottom = bl + (br - bl) * fx`, `out = top + (bottom - top) * fy`
    with the coordinates of `crop_sample_coords`; then `floor(min(clip(out, 0, 1) * 255.5, 255))`
    (TF scales by `max + 0.5` and truncates). Op by op (eager) this is bit-exact with TF's CPU
    kernel. Inside `jit`, XLA fuses the chain and LLVM contracts `a + b * t` into FMAs (one
    rounding instead of two; an optimisation barrier does not survive XLA's passes), which moved
    12 of 4.8 M pixels by one uint8 level in a measurement on CPU; GPUs contract the same way.
    """
    _, h, w, _ = images.shape
    if h != w:
        raise ValueError(f"center_crop_resize expects square images, got H={h}, W={w}")
    lo, hi, frac = crop_sample_coords(h, out_size, crop_area)
    x = images.astype(jnp.float32) * np.float32(1.0 / 255.0)
    fy = jnp.asarray(frac)[None, :, None, None]
    fx = jnp.asarray(frac)[None, None, :, None]

    def lerp_cols(rows):
        left = jnp.take(rows, lo, axis=2)
        right = jnp.take(rows, hi, axis=2)
        return left + (right - left) * fx

    top = lerp_cols(jnp.take(x, lo, axis=1))
    bottom = lerp_cols(jnp.take(x, hi, axis=1))
    out = top + (bottom - top) * fy
    return jnp.floor(jnp.minimum(jnp.clip(out, 0.0, 1.0) * np.float32(255.5), 255.0))


def random_crop_resize(images: jax.Array, offsets: jax.Array, crop_area: float = 0.9,
                       out_size: int = 224) -> jax.Array:
    """OFT's training augmentation (`random_resized_crop(scale=[0.9, 0.9], ratio=[1, 1])`): a square
    box of `crop_area` of the image at a per-image position, resized back bilinearly, quantised like
    `center_crop_resize` (the same sampling formula with the box moved; offsets 0.5 = its centre box).

    images: (N, H, W, C) holding integers 0..255; offsets: (N, 2) float in [0, 1], the box's (y, x)
    position as a fraction of the free margin (traced: a new draw does not recompile).
    Returns float32 (N, out_size, out_size, C) holding integers 0..255."""
    n, h, w, _ = images.shape
    if h != w:
        raise ValueError(f"random_crop_resize expects square images, got H={h}, W={w}")
    f32 = np.float32
    side = np.clip(np.sqrt(f32(crop_area)), f32(0), f32(1)).astype(f32)
    scale = f32(f32(side) * f32(h - 1)) / f32(out_size - 1)
    start = jnp.clip(offsets.astype(jnp.float32), 0.0, 1.0) * (f32(1) - side)  # (N, 2) box corner
    i = jnp.arange(out_size, dtype=jnp.float32)
    coords = jnp.clip(start[:, :, None] * f32(h - 1) + i * scale, 0.0, f32(h - 1))  # (N, 2, out)
    lo = jnp.floor(coords).astype(jnp.int32)
    hi = jnp.ceil(coords).astype(jnp.int32)
    frac = coords - lo.astype(jnp.float32)
    x = images.astype(jnp.float32) * np.float32(1.0 / 255.0)

    def one(img, lo, hi, frac):  # img (H, W, C); lo/hi/frac (2, out)
        rows_lo, rows_hi = jnp.take(img, lo[0], axis=0), jnp.take(img, hi[0], axis=0)
        fx = frac[1][None, :, None]

        def lerp_cols(rows):
            left, right = jnp.take(rows, lo[1], axis=1), jnp.take(rows, hi[1], axis=1)
            return left + (right - left) * fx

        top, bottom = lerp_cols(rows_lo), lerp_cols(rows_hi)
        return top + (bottom - top) * frac[0][:, None, None]

    out = jax.vmap(one)(x, lo, hi, frac)
    return jnp.floor(jnp.minimum(jnp.clip(out, 0.0, 1.0) * np.float32(255.5), 255.0))


@partial(jax.jit, static_argnames=("flip", "center_crop", "resize_to", "crop_area"))
def preprocess_images(images: jax.Array, *, flip: bool = True, center_crop: bool = True,
                      resize_to: int = 224, crop_area: float = 0.9, crop_offsets: jax.Array | None = None) -> jax.Array:
    """Raw camera frames -> Prismatic `pixel_values`.

    images: uint8 (B, n_img, H, W, 3) or (B, H, W, 3) (one image per sample).
    Returns float32 (B, 6 * n_img, resize_to, resize_to): for image k, channels 6k:6k+3 are the
    DINOv2-normalised RGB and 6k+3:6k+6 the SigLIP-normalised RGB (CHW), as the HF Prismatic
    processor and OFT's multi-image concatenation produce.

    flip: rotate 180° first (LIBERO frames). center_crop: apply the 0.9-area centre crop that
    matches the training-time random-resized-crop augmentation (OFT `center_crop=True`).
    crop_offsets: (B, 2) float in [0, 1]: crop the same area at these positions instead
    (`random_crop_resize`, the training augmentation; every image of a sample alike).
    Vectorised over batch and images; jit-compiled with the keyword arguments static.
    """
    if images.dtype != jnp.uint8:
        raise TypeError(f"preprocess_images: `images` must be uint8, got {images.dtype}")
    if images.ndim == 4:
        images = images[:, None]
    if images.ndim != 5 or images.shape[-1] != 3:
        raise ValueError("preprocess_images: `images` must be (B, n_img, H, W, 3) or (B, H, W, 3), "
                         f"got shape {images.shape}")
    b, n_img, h, w, _ = images.shape
    x = images.reshape(b * n_img, h, w, 3)
    if flip:
        x = x[:, ::-1, ::-1, :]
    x = resize_lanczos(x, resize_to)
    if crop_offsets is not None:
        x = random_crop_resize(x, jnp.repeat(crop_offsets, n_img, axis=0), crop_area, resize_to)
    elif center_crop:
        x = center_crop_resize(x, crop_area, resize_to)
    x = x / np.float32(255.0)
    mean = jnp.asarray(DINO_MEAN + SIGLIP_MEAN, jnp.float32)
    std = jnp.asarray(DINO_STD + SIGLIP_STD, jnp.float32)
    x = (jnp.concatenate([x, x], axis=-1) - mean) / std  # (N, S, S, 6)
    x = x.transpose(0, 3, 1, 2)  # (N, 6, S, S)
    return x.reshape(b, n_img * 6, resize_to, resize_to)


def jpeg_roundtrip(images: np.ndarray, quality: int = TF_JPEG_QUALITY, decoder: str = "auto") -> np.ndarray:
    """Host-side JPEG encode + decode of uint8 (..., H, W, 3) frames, like the RLDS builder's
    `tf.io.decode_image(tf.image.encode_jpeg(x))`. Returns the same shape and dtype.

    Encoding uses Pillow (libjpeg-turbo, islow DCT, 4:2:0 chroma subsampling, IJG tables scaled by
    `quality`): TF's `encode_jpeg` defaults (quality 95, chroma_downsampling=True) give the same
    coefficients. TF *decodes* with the fast integer IDCT (JDCT_IFAST, TF's default `dct_method`)
    and fancy upsampling, which Pillow cannot select. Hence `decoder`:
      - "simplejpeg": `simplejpeg.decode_jpeg(fastdct=True, fastupsample=False)`, bit-exact with TF
        (measured on noise, smooth and blocky 256x256 frames and odd sizes, TF 2.21);
      - "pillow": libjpeg's accurate islow IDCT; differs from TF by ~1 uint8 level on average
        (max ~15 on noise);
      - "auto": simplejpeg if installed, else Pillow.
    Off by default in the policy pipeline; it costs ~1 ms per 256x256 frame on one CPU core.
    """
    from PIL import Image  # Pillow ships with imageio

    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim < 3 or arr.shape[-1] != 3:
        raise ValueError(f"jpeg_roundtrip: expected uint8 (..., H, W, 3), got {arr.dtype} {arr.shape}")
    if decoder not in ("auto", "simplejpeg", "pillow"):
        raise ValueError(f"jpeg_roundtrip: decoder must be auto|simplejpeg|pillow, got {decoder!r}")
    decode = None
    if decoder in ("auto", "simplejpeg"):
        try:
            import simplejpeg

            def decode(data: bytes) -> np.ndarray:
                return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)
        except ImportError:
            if decoder == "simplejpeg":
                raise ImportError("jpeg_roundtrip(decoder='simplejpeg') needs `pip install simplejpeg`")
    if decode is None:
        def decode(data: bytes) -> np.ndarray:
            return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    flat = arr.reshape((-1,) + arr.shape[-3:])
    out = np.empty_like(flat)
    for k, frame in enumerate(flat):
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=quality, subsampling="4:2:0")
        out[k] = decode(buf.getvalue())
    return out.reshape(arr.shape)


def normalize_proprio(proprio, q01, q99, mask=None):
    """BOUNDS_Q99 normalisation (OFT `normalize_proprio`): `clip(2 (p - q01) / (q99 - q01 + 1e-8) - 1,
    -1, 1)` where `mask` is True; masked-out dims pass through (still clipped, as in OFT).

    proprio: (..., D); q01, q99, mask: (D,) from the checkpoint's `dataset_statistics.json`.
    """
    proprio = jnp.asarray(proprio, jnp.float32)
    q01 = jnp.asarray(q01, jnp.float32)
    q99 = jnp.asarray(q99, jnp.float32)
    if q01.shape != q99.shape or proprio.shape[-1:] != q01.shape:
        raise ValueError(f"normalize_proprio: proprio {proprio.shape} vs q01 {q01.shape} / "
                         f"q99 {q99.shape} do not match in the last dim")
    normed = 2.0 * (proprio - q01) / (q99 - q01 + 1e-8) - 1.0
    if mask is not None:
        normed = jnp.where(jnp.asarray(mask, bool), normed, proprio)
    return jnp.clip(normed, -1.0, 1.0)


def standardize_proprio(proprio, mean, std):
    """openpi's z-score normalisation (`Normalize` without quantiles): `(p - mean) / (std + 1e-6)`,
    unclipped. proprio: (..., D); mean, std: (D,) from the checkpoint's `norm_stats.json`."""
    proprio = jnp.asarray(proprio, jnp.float32)
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    if mean.shape != std.shape or proprio.shape[-1:] != mean.shape:
        raise ValueError(f"standardize_proprio: proprio {proprio.shape} vs mean {mean.shape} / std {std.shape} "
                         "do not match in the last dim")
    return (proprio - mean) / (std + 1e-6)


# how a family's policies normalise the robot state (`HostPolicy.proprio_norm`), each taking the pair
# of arrays `proprio_stats` gives
PROPRIO_NORMS = {"bounds": normalize_proprio, "zscore": standardize_proprio}


__all__ = [
    "preprocess_images", "resize_lanczos", "center_crop_resize", "random_crop_resize", "crop_sample_coords",
    "jpeg_roundtrip", "normalize_proprio", "DINO_MEAN", "DINO_STD", "SIGLIP_MEAN", "SIGLIP_STD",
    "TF_JPEG_QUALITY",
]
