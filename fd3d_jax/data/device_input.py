"""The image part of the input pipeline as pure jnp, for the start of a jitted step (``data.device_normalize``).

With ``config.data.device_normalize`` the host pipeline (``fd3d_jax.data.pipeline``) only decodes: it emits
``img`` as the raw camera images, uint8 (B, T, N, H_raw, W_raw, 3) RGB, and in training with
``data.photometric`` the random draws of every image, taken from the same RNG stream in the same order as the
host path (``augment.photometric_params``), as
  photo_params  (B, T, N, 5) float32  brightness, contrast before the HSV round trip, saturation, hue,
                                      contrast after it (``augment.photometric_arrays``)
  photo_perm    (B, T, N, 3) int32    RGB channel gather of the channel swap
``prepare_images`` then does on the device what ``pipeline.load_frame`` does on the host, in the same order:
photometric distortion (float32 0..255, cv2's float HSV formulas) -> RGB/BGR -> ``(x - mean) / std`` ->
bilinear resize by ``data.image_scale`` (cv2 ``INTER_LINEAR``: half-pixel centres, no antialiasing, edge taps
clamped as cv2 does) -> zero padding to ``data.pad_divisor``. The result equals the host path's float32
``img`` up to float rounding (tests/data/test_device_input.py). The distortion is not linear, so it has to run
at the raw resolution, before the resize: the device gets the raw images.

Why: on the host the float32 distortion, normalisation and resize are ~5/6 of the CPU time of a sample, and a
float32 image is 4 bytes a value against 1; on an accelerator they are a few elementwise passes.

``prepare_images`` is idempotent: a batch whose ``img`` is already floating point (the host path, or already
prepared) is returned unchanged, so the train step, the eval step and ``distill.expert.expert_batch`` may each
call it.
"""
import jax.numpy as jnp
import numpy as np

PHOTO_KEYS = ('photo_params', 'photo_perm')
FLT_EPSILON = np.float32(np.finfo(np.float32).eps)


def output_hw(raw_hw, data_cfg):
    """(resized (h, w), padded (H, W)) of a raw image size, as ``pipeline.output_image_hw`` computes them."""
    scale = data_cfg.image_scale
    h, w = int(raw_hw[0] * scale), int(raw_hw[1] * scale)
    divisor = data_cfg.pad_divisor
    return (h, w), (-(-h // divisor) * divisor, -(-w // divisor) * divisor)


def linear_taps(in_size, out_size, clamp_weights):
    """cv2 ``INTER_LINEAR`` taps of one axis: numpy (out,) int32 i0, i1 and float32 w0, w1 with
    ``out[d] = src[i0] * w0 + src[i1] * w1``. Source coordinate ``(d + 0.5) * in / out - 0.5`` and its fraction
    in float64, rounded to float32 last (as cv2 does: in float32 the fraction at x ~ 1000 is off by 1e-4). Columns (``clamp_weights``) take the edge pixel with weight 1 outside the image, rows keep
    their fraction with clamped indices (cv2's horizontal and vertical passes differ so)."""
    scale = 1.0 / (out_size / in_size)
    f = (np.arange(out_size) + 0.5) * scale - 0.5
    s = np.floor(f).astype(np.int64)
    f = (f - s).astype(np.float32)
    if clamp_weights:
        low, high = s < 0, s >= in_size - 1
        f[low], s[low] = 0, 0
        f[high], s[high] = 0, in_size - 1
    i0 = np.clip(s, 0, in_size - 1).astype(np.int32)
    i1 = np.clip(s + 1, 0, in_size - 1).astype(np.int32)
    return i0, i1, (np.float32(1) - f).astype(np.float32), f


def resize_bilinear(img, out_hw):
    """cv2 ``resize(..., INTER_LINEAR)`` of float images (..., H, W, C) to ``out_hw``: the horizontal pass,
    then the vertical one, two taps each (gathers with static indices)."""
    h, w = img.shape[-3:-1]
    if (h, w) == tuple(out_hw):
        return img
    i0, i1, w0, w1 = linear_taps(w, out_hw[1], clamp_weights=True)
    img = img[..., i0, :] * w0[:, None] + img[..., i1, :] * w1[:, None]
    i0, i1, w0, w1 = linear_taps(h, out_hw[0], clamp_weights=False)
    return img[..., i0, :, :] * w0[:, None, None] + img[..., i1, :, :] * w1[:, None, None]


def rgb_to_hsv(img):
    """cv2 ``COLOR_RGB2HSV`` on float32 (..., 3): H in degrees [0, 360), S = (V - min) / (|V| + eps), V = max."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    v = jnp.maximum(jnp.maximum(r, g), b)
    vmin = jnp.minimum(jnp.minimum(r, g), b)
    diff = v - vmin
    s = diff / (jnp.abs(v) + FLT_EPSILON)
    diff = np.float32(60) / (diff + FLT_EPSILON)
    h = jnp.where(v == r, (g - b) * diff, jnp.where(v == g, (b - r) * diff + np.float32(120),
                                                     (r - g) * diff + np.float32(240)))
    h = jnp.where(h < 0, h + np.float32(360), h)
    return h, s, v


def hsv_to_rgb(h, s, v):
    """cv2 ``COLOR_HSV2RGB`` on float32 H in degrees, S, V: the sector formulas of ``HSV2RGB_f``."""
    h = h * np.float32(6.0 / 360.0)
    h = jnp.where(h < 0, h + np.float32(6), h)
    h = jnp.where(h >= 6, h - np.float32(6), h)
    sector = jnp.floor(h)
    h = h - sector
    sector = sector.astype(jnp.int32)
    bad = (sector < 0) | (sector >= 6)
    sector, h = jnp.where(bad, 0, sector), jnp.where(bad, np.float32(0), h)
    one = np.float32(1)
    tab = jnp.stack([v, v * (one - s), v * (one - s * h), v * (one - s * (one - h))], axis=-1)
    # cv2's sector_data (b, g, r) rows, here as (r, g, b) indices into tab
    rows = jnp.asarray([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]], jnp.int32)
    rgb = jnp.take_along_axis(tab, rows[sector], axis=-1)
    return jnp.where((s == 0)[..., None], v[..., None], rgb)


def photometric(img, params, perm):
    """``augment.photometric_from_params`` on float32 RGB images (..., H, W, 3) in 0..255 with per-image
    ``params`` (..., 5) and ``perm`` (..., 3) (``augment.photometric_arrays``)."""
    p = params[..., None, None, :].astype(jnp.float32)
    img = (img + p[..., 0:1]) * p[..., 1:2]
    h, s, v = rgb_to_hsv(img)
    s = s * p[..., 2]
    h = h + p[..., 3]
    h = jnp.where(h > 360, h - np.float32(360), h)
    h = jnp.where(h < 0, h + np.float32(360), h)
    img = hsv_to_rgb(h, s, v) * p[..., 4:5]
    return jnp.take_along_axis(img, jnp.broadcast_to(perm[..., None, None, :], img.shape), axis=-1)


def prepare_images(batch, data_cfg):
    """``batch`` with ``img`` uint8 raw RGB (..., H_raw, W_raw, 3) replaced by the float32 normalised, resized,
    padded images (..., H, W, 3) of the host pipeline, the photometric draws (``PHOTO_KEYS``) applied and
    removed. A batch whose ``img`` is not uint8 is returned as it is (idempotent)."""
    img = batch['img']
    if img.dtype != jnp.uint8:
        return batch
    out = {k: v for k, v in batch.items() if k not in PHOTO_KEYS}
    img = img.astype(jnp.float32)
    if 'photo_params' in batch:
        img = photometric(img, batch['photo_params'], batch['photo_perm'])
    if not data_cfg.to_rgb:
        img = img[..., ::-1]
    img = (img - np.asarray(data_cfg.image_mean, np.float32)) / np.asarray(data_cfg.image_std, np.float32)
    (h, w), (ph, pw) = output_hw(img.shape[-3:-1], data_cfg)
    img = resize_bilinear(img, (h, w))
    pad = [(0, 0)] * (img.ndim - 3) + [(0, ph - h), (0, pw - w), (0, 0)]
    out['img'] = jnp.pad(img, pad)
    return out
