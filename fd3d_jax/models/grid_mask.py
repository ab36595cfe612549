"""GridMask (Chen et al., 2020) as BEVFormer/DETR3D use it (``models/utils/grid_mask.py::GridMask``,
built as ``GridMask(True, True, rotate=1, offset=False, ratio=0.5, mode=1, prob=0.7)``).

One mask is drawn per forward pass and shared by all B*N images and channels. With probability
``prob``: ``d ~ randint[2, H)`` (the module draws from ``[2, h)``; the unused ``Grid`` class uses
``min(h, w)``), ``l = min(max(int(d * ratio + 0.5), 1), d - 1)``, ``st_h, st_w ~ randint[0, d)``; on a
``(int(1.5 H), int(1.5 W))`` canvas of ones, rows ``[d i + st_h, d i + st_h + l)`` for ``i < hh // d``
(and columns likewise, ``i < ww // d``) are zeroed; the centre ``(H, W)`` crop is taken, ``mode=1``
inverts it (only the stripes are kept) and the images are multiplied by it (``offset``: masked-out
pixels get ``U(-1, 1)`` noise instead of 0). Before the crop the canvas is rotated by ``r ~ randint[0,
rotate)`` degrees (PIL ``Image.rotate``: counter-clockwise about the canvas centre, nearest neighbour,
zero fill); the released configs use ``rotate=1``, i.e. never rotate.

The mask is built from iota comparisons: a row ``r`` of the canvas is in a stripe iff
``r >= st_h``, ``(r - st_h) // d < hh // d`` and ``(r - st_h) % d < l`` (stripes never overlap
since ``l < d``, and the ``min(., hh)`` clip is implied by ``r < hh``). With a rotation each crop pixel
reads the canvas at its pixel centre mapped back by the inverse rotation, floored (PIL's nearest
affine transform, which PIL computes in fixed point: equal pixel for pixel in the tests).
"""
import jax
import jax.numpy as jnp


def _in_stripe(pos, full, period, st, stripe_len):
    """bool like ``pos``: canvas positions ``pos`` (int, ``0 <= pos < full``) of one axis that a stripe covers."""
    rel = pos - st
    return ((rel >= 0) & (jnp.floor_divide(jnp.maximum(rel, 0), period) < full // period)
            & (jnp.mod(jnp.maximum(rel, 0), period) < stripe_len))


def _stripes(size, full, offset, period, st, stripe_len):
    """(size,) bool: positions ``offset .. offset + size`` of a ``full``-long canvas axis in a stripe."""
    return _in_stripe(jnp.arange(size, dtype=jnp.int32) + offset, full, period, st, stripe_len)


def _rotated_canvas(height, width, hh, ww, period, st_h, st_w, stripe_len, use_h, use_w, angle):
    """(height, width) bool: the centre crop of the (hh, ww) canvas (True = not in a stripe) rotated by ``angle``
    degrees counter-clockwise about its centre, nearest neighbour, False outside (PIL ``Image.rotate``)."""
    pix_y = jnp.arange(height, dtype=jnp.float32)[:, None] + ((hh - height) // 2 + 0.5 - hh / 2)  # pixel centres about
    pix_x = jnp.arange(width, dtype=jnp.float32)[None, :] + ((ww - width) // 2 + 0.5 - ww / 2)    # the canvas centre
    theta = jnp.deg2rad(jnp.asarray(angle, jnp.float32))
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    xi = jnp.floor(cos * pix_x - sin * pix_y + ww / 2).astype(jnp.int32)  # PIL's inverse map for -angle
    yi = jnp.floor(sin * pix_x + cos * pix_y + hh / 2).astype(jnp.int32)
    inside = (xi >= 0) & (xi < ww) & (yi >= 0) & (yi < hh)
    stripe = jnp.zeros((height, width), bool)
    if use_h:
        stripe |= _in_stripe(yi, hh, period, st_h, stripe_len)
    if use_w:
        stripe |= _in_stripe(xi, ww, period, st_w, stripe_len)
    return inside & ~stripe


def grid_mask_from_params(img, period, st_h, st_w, apply, ratio=0.5, use_h=True, use_w=True, mode=1, offset=None,
                          angle=None):
    """GridMask with given draws. img (M, H, W, C); period (``d``), st_h, st_w int scalars (may be traced); apply
    bool scalar; offset: None or the (H, W) noise of ``offset=True``; angle: None (no rotation) or the
    rotation in degrees (may be traced). Returns (M, H, W, C), img's dtype."""
    if mode not in (0, 1):
        raise ValueError(f'GridMask mode must be 0 or 1, got {mode}')
    height, width = img.shape[1:3]
    hh, ww = int(1.5 * height), int(1.5 * width)
    period = jnp.asarray(period, jnp.int32)
    stripe_len = jnp.clip(jnp.floor(period.astype(jnp.float32) * ratio + 0.5).astype(jnp.int32), 1, None)
    stripe_len = jnp.minimum(stripe_len, period - 1)
    st_h, st_w = jnp.asarray(st_h, jnp.int32), jnp.asarray(st_w, jnp.int32)
    if angle is None:
        zero = jnp.zeros((height, width), bool)
        rows = _stripes(height, hh, (hh - height) // 2, period, st_h, stripe_len)[:, None] if use_h else zero
        cols = _stripes(width, ww, (ww - width) // 2, period, st_w, stripe_len)[None, :] if use_w else zero
        mask = ~(rows | cols)                   # canvas of ones with zeroed stripes, centre crop
    else:
        mask = _rotated_canvas(height, width, hh, ww, period, st_h, st_w, stripe_len, use_h, use_w, angle)
    if mode == 1:
        mask = ~mask
    mask = mask.astype(img.dtype)[None, :, :, None]
    if offset is None:
        out = img * mask
    else:
        out = img * mask + jnp.asarray(offset, img.dtype)[None, :, :, None] * (1 - mask)
    return jnp.where(apply, out, img)


def grid_mask(img, rng, prob=0.7, ratio=0.5, use_h=True, use_w=True, mode=1, rotate=1, offset=False):
    """GridMask of one forward pass: img (M, H, W, C) (M = B*N), rng a PRNG key; one mask for all M
    images, applied with probability ``prob``; rotated by ``randint[0, rotate)`` degrees when ``rotate > 1``.
    Returns (M, H, W, C)."""
    if rotate < 1:
        raise ValueError(f'GridMask rotate must be >= 1 (randint(rotate) degrees), got {rotate}')
    height, width = img.shape[1:3]
    if height <= 2:
        raise ValueError(f'GridMask needs images taller than 2 pixels, got H={height}')
    k_apply, k_d, k_h, k_w, k_off, k_rot = jax.random.split(rng, 6)
    apply = jax.random.uniform(k_apply) < prob
    period = jax.random.randint(k_d, (), 2, height)
    st_h = jax.random.randint(k_h, (), 0, period)
    st_w = jax.random.randint(k_w, (), 0, period)
    noise = 2.0 * (jax.random.uniform(k_off, (height, width)) - 0.5) if offset else None
    angle = jax.random.randint(k_rot, (), 0, rotate) if rotate > 1 else None
    return grid_mask_from_params(img, period, st_h, st_w, apply, ratio, use_h, use_w, mode, noise, angle)
