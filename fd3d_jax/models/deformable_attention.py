"""Multi-scale deformable attention (MSDA, Deformable DETR / mmcv), the sampling core of BEVFormer's
TSA, SCA and decoder cross-attention and of DETR3D's feature sampling.

Shapes: ``value`` (B, S, M, Dh) with S = sum_l H_l * W_l (each level flattened row-major, levels
concatenated); ``spatial_shapes`` a static tuple ((H_l, W_l), ...); ``sampling_locations``
(B, Q, M, L, P, 2) normalised (x, y) in [0, 1] (x along columns, y along rows);
``attention_weights`` (B, Q, M, L, P). Output (B, Q, M * Dh), heads concatenated.

Pixel convention (mmcv CUDA kernel = ``grid_sample(align_corners=False, padding_mode='zeros')``):
``w = x * W_l - 0.5``, ``h = y * H_l - 0.5``, bilinear over the 4 neighbouring pixel centres, each
corner outside the map contributing zero.

``ms_deform_attn`` is the production core: queries of all batch elements are flattened to B*Q rows
and processed in chunks with ``lax.map`` over a ``jax.checkpoint``-ed chunk function, so neither the
forward nor the backward pass holds more than one chunk's gathered (rows, M, L*P*4, Dh) taps.
``ms_deform_attn_reference`` is the direct version, kept for tests and benchmarks. At BEVFormer-Base
SCA sizes (6 cameras x 40k BEV queries, 4 levels, P=8; inputs + output 1.2 GB) XLA:CPU's
``memory_analysis()`` gives 0.02 / 0.04 GB of temp buffers for the chunked forward / forward+backward,
against 33 / 67 GB for the reference (``experiments/bench_msda.py``).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_MiB = 1 << 20
xavier_uniform = nn.initializers.xavier_uniform()


def grid_init_bias(num_heads, num_levels, num_points):
    """Deformable-DETR ``sampling_offsets`` bias, (M, L, P, 2) float32 in pixels: head m points along
    ``(cos, sin)(2 pi m / M) / max(|cos|, |sin|)`` (onto the unit square's boundary), point p at
    ``(p + 1)`` times that, the same for every level. Flatten it to (M*L*P*2,) for a Dense bias.
    Computed in float64 (mmcv: float32 trig, so entries differ by <= 1e-6 relative)."""
    theta = np.arange(num_heads) * (2.0 * math.pi / num_heads)
    grid = np.stack([np.cos(theta), np.sin(theta)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)                       # (M, 2)
    radius = np.arange(1, num_points + 1, dtype=np.float64)                 # (P,)
    grid = grid[:, None, None, :] * radius[None, None, :, None]             # (M, 1, P, 2)
    return np.broadcast_to(grid, (num_heads, num_levels, num_points, 2)).astype(np.float32)


def _static_shapes(spatial_shapes):
    return tuple((int(h), int(w)) for h, w in spatial_shapes)


def _check(value, spatial_shapes, sampling_locations, attention_weights):
    b, s, m, _ = value.shape
    assert s == sum(h * w for h, w in spatial_shapes), (value.shape, spatial_shapes)
    assert sampling_locations.shape[:3] == (b, sampling_locations.shape[1], m), (value.shape, sampling_locations.shape)
    assert sampling_locations.shape[3] == len(spatial_shapes) and sampling_locations.shape[-1] == 2, \
        (sampling_locations.shape, spatial_shapes)
    assert attention_weights.shape == sampling_locations.shape[:-1], (attention_weights.shape, sampling_locations.shape)


# ----------------------------------------------------------------------------------------------
# Reference: one level and one corner at a time, advanced indexing into (B, H, W, M, Dh).
# ----------------------------------------------------------------------------------------------

def ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights):
    """Direct MSDA (materialises every gathered corner). Same arguments/result as ``ms_deform_attn``."""
    spatial_shapes = _static_shapes(spatial_shapes)
    value, sampling_locations, attention_weights = map(jnp.asarray, (value, sampling_locations, attention_weights))
    _check(value, spatial_shapes, sampling_locations, attention_weights)
    b, q, m, _, p, _ = sampling_locations.shape
    bi = jnp.arange(b)[:, None, None, None]                                 # (B, 1, 1, 1)
    mi = jnp.arange(m)[None, None, :, None]                                 # (1, 1, M, 1)
    out, start = 0.0, 0
    for lvl, (hh, ww) in enumerate(spatial_shapes):
        v = value[:, start:start + hh * ww].reshape(b, hh, ww, m, -1)
        start += hh * ww
        w = sampling_locations[:, :, :, lvl, :, 0] * ww - 0.5               # (B, Q, M, P)
        h = sampling_locations[:, :, :, lvl, :, 1] * hh - 0.5
        h0, w0 = jnp.floor(h), jnp.floor(w)
        lh, lw = h - h0, w - w0
        for dh, dw, corner in ((0, 0, (1 - lh) * (1 - lw)), (0, 1, (1 - lh) * lw),
                               (1, 0, lh * (1 - lw)), (1, 1, lh * lw)):
            r, c = h0 + dh, w0 + dw                                         # float corner coords
            inside = (r >= 0) & (r <= hh - 1) & (c >= 0) & (c <= ww - 1)
            r = jnp.clip(r, 0, hh - 1).astype(jnp.int32)
            c = jnp.clip(c, 0, ww - 1).astype(jnp.int32)
            tap = v[bi, r, c, mi]                                           # (B, Q, M, P, Dh)
            wt = jnp.where(inside, corner, 0.0) * attention_weights[:, :, :, lvl]
            out = out + jnp.einsum('bqmp,bqmpd->bqmd', wt, tap)
    return out.reshape(b, q, -1).astype(value.dtype)


# ----------------------------------------------------------------------------------------------
# Production core: flattened rows, one gather per chunk from a (B*S*M, Dh) table.
# ----------------------------------------------------------------------------------------------

def default_chunk_bytes():
    """Gathered-tap bytes per chunk. 16 MiB measured best on a 2-core CPU (cache-resident chunks);
    on accelerators a larger chunk (256 MiB, not measured here) keeps the number of sequential
    ``lax.map`` steps (kernel launches) low."""
    return 16 * _MiB if jax.default_backend() == 'cpu' else 256 * _MiB


def _row_bytes(value, sampling_locations):
    """Bytes of gathered taps per flattened (batch, query) row."""
    _, _, m, lv, p, _ = sampling_locations.shape
    return m * lv * p * 4 * value.shape[-1] * max(jnp.dtype(value.dtype).itemsize, 4)


def choose_chunk(rows, row_bytes, chunk_bytes):
    """Rows per chunk for a ``chunk_bytes`` budget. Prefers the largest divisor of ``rows`` in
    [target / 2, target] (no padding: a pad copies the locations/weights and the output slice copies
    the result, which costs more memory than everything else at BEVFormer-Base), else the balanced
    ``ceil(rows / ceil(rows / target))`` with padding."""
    target = max(1, int(chunk_bytes) // int(row_bytes))
    if target >= rows:
        return rows
    for d in range(target, (target - 1) // 2, -1):
        if rows % d == 0:
            return d
    return -(-rows // -(-rows // target))


def _sample_rows(table, row_base, loc, attn, spatial_shapes, num_heads):
    """Weighted bilinear sampling of a block of rows.

    table (B*S*M, Dh) = value flattened; row_base (c,) int32 = b * S for each row's batch element;
    loc (c, M, L, P, 2); attn (c, M, L, P) -> (c, M*Dh)."""
    c = loc.shape[0]
    cdt = jnp.promote_types(loc.dtype, jnp.float32)
    heights = np.array([h for h, _ in spatial_shapes])[:, None]            # (L, 1)
    widths = np.array([w for _, w in spatial_shapes])[:, None]
    starts = np.cumsum([0] + [h * w for h, w in spatial_shapes])[:-1, None]
    w = loc[..., 0].astype(cdt) * widths.astype(cdt) - 0.5                 # (c, M, L, P)
    h = loc[..., 1].astype(cdt) * heights.astype(cdt) - 0.5
    # Points with h <= -1 or h >= H sample nothing; clipping them to [-2, H + 1] keeps that (every
    # corner stays outside) and keeps far-away coordinates within int32.
    w = jnp.clip(w, -2.0, widths + 1.0)
    h = jnp.clip(h, -2.0, heights + 1.0)
    w0, h0 = jnp.floor(w), jnp.floor(h)
    lw, lh = w - w0, h - h0
    w0, h0 = w0.astype(jnp.int32), h0.astype(jnp.int32)
    base = row_base[:, None, None, None] + starts.astype(np.int32)          # (c, 1, L, 1)
    head = jnp.arange(num_heads, dtype=jnp.int32)[:, None, None]            # (M, 1, 1)
    attn = attn.astype(cdt)
    idx, wts = [], []
    for dh, dw, corner in ((0, 0, (1 - lh) * (1 - lw)), (0, 1, (1 - lh) * lw),
                           (1, 0, lh * (1 - lw)), (1, 1, lh * lw)):
        r, col = h0 + dh, w0 + dw
        inside = (r >= 0) & (r < heights) & (col >= 0) & (col < widths)
        pix = jnp.clip(r, 0, heights - 1) * widths + jnp.clip(col, 0, widths - 1)
        idx.append((base + pix) * num_heads + head)
        wts.append(jnp.where(inside, corner, 0.0) * attn)
    idx = jnp.stack(idx, -1).reshape(c, num_heads, -1)                      # (c, M, L*P*4)
    wts = jnp.stack(wts, -1).reshape(c, num_heads, -1)
    taps = table.at[idx].get(mode='promise_in_bounds')                      # (c, M, L*P*4, Dh)
    acc = jnp.promote_types(table.dtype, cdt)
    out = jnp.einsum('cmk,cmkd->cmd', wts.astype(acc), taps.astype(acc))
    return out.reshape(c, -1)


def ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights, *, query_chunk=None,
                   chunk_bytes=None):
    """Memory-bounded MSDA, numerically equal to ``ms_deform_attn_reference``.

    value (B, S, M, Dh); spatial_shapes static ((H_l, W_l), ...); sampling_locations
    (B, Q, M, L, P, 2) normalised (x, y); attention_weights (B, Q, M, L, P) -> (B, Q, M*Dh) in
    ``value.dtype`` (accumulated in at least float32). Differentiable in all three arrays.

    The B*Q (batch, query) rows are flattened (free reshapes, no transpose) and cut into chunks of
    ``query_chunk`` rows (default ``choose_chunk`` with ``chunk_bytes`` of gathered taps, default
    ``default_chunk_bytes()``); the rows are padded (and the output sliced) when the chunk does not
    divide B*Q. Each chunk does one gather from value viewed as a (B*S*M, Dh) table; the chunk
    function is rematerialised, so the backward pass recomputes one chunk's taps at a time and
    scatter-adds into a single d_value buffer.
    """
    spatial_shapes = _static_shapes(spatial_shapes)
    value, sampling_locations, attention_weights = map(jnp.asarray, (value, sampling_locations, attention_weights))
    _check(value, spatial_shapes, sampling_locations, attention_weights)
    b, s, m, dh = value.shape
    q = sampling_locations.shape[1]
    rows = b * q
    assert b * s * m < 2 ** 31, 'int32 gather indices'
    table = value.reshape(b * s * m, dh)
    loc = sampling_locations.reshape((rows,) + sampling_locations.shape[2:])
    attn = attention_weights.reshape((rows,) + attention_weights.shape[2:])
    if query_chunk is None:
        chunk = choose_chunk(rows, _row_bytes(value, sampling_locations),
                             default_chunk_bytes() if chunk_bytes is None else chunk_bytes)
    else:
        chunk = max(1, min(int(query_chunk), rows))

    def rows_out(start, loc_c, attn_c):
        ids = start + jnp.arange(loc_c.shape[0], dtype=jnp.int32)
        row_base = jnp.minimum(ids // q, b - 1) * s                        # padded rows -> last element
        return _sample_rows(table, row_base, loc_c, attn_c, spatial_shapes, m)

    if chunk == rows:
        out = rows_out(0, loc, attn)
    else:
        nc = -(-rows // chunk)
        pad = nc * chunk - rows
        if pad:  # padded rows have weight 0: no output, no gradient
            loc = jnp.pad(loc, ((0, pad),) + ((0, 0),) * (loc.ndim - 1))
            attn = jnp.pad(attn, ((0, pad),) + ((0, 0),) * (attn.ndim - 1))
        loc = loc.reshape((nc, chunk) + loc.shape[1:])
        attn = attn.reshape((nc, chunk) + attn.shape[1:])
        body = jax.checkpoint(lambda args: rows_out(args[0] * chunk, args[1], args[2]), prevent_cse=False)
        out = jax.lax.map(body, (jnp.arange(nc, dtype=jnp.int32), loc, attn)).reshape(nc * chunk, m * dh)
        if pad:
            out = out[:rows]
    return out.reshape(b, q, m * dh).astype(value.dtype)


# ----------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------

def _constant_init(array):
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.asarray(array, dtype).reshape(shape)
    return init


class MSDeformableAttention(nn.Module):
    """mmcv ``MultiScaleDeformableAttention`` / BEVFormer ``CustomMSDeformableAttention`` (batch first).

    ``value_proj`` (xavier-uniform, bias 0), ``sampling_offsets`` (weight 0, bias
    ``grid_init_bias``), ``attention_weights`` (weight and bias 0; softmax over L*P per head),
    ``output_proj`` (xavier-uniform, bias 0), dropout, residual with the query before ``query_pos``.

    __call__(query (B, Q, C), value (B, S, C), reference_points (B, Q, L or 1, 2) normalised (x, y),
    spatial_shapes static ((H_l, W_l), ...), query_pos (B, Q, C) or None, deterministic) ->
    (out (B, Q, C), dict(sampling_locations (B, Q, M, L, P, 2), attention_weights (B, Q, M, L, P))).

    Not supported (unused by BEVFormer/DETR3D): ``key_padding_mask``, 4-d box reference points,
    a separate ``identity`` argument, sequence-first layout.
    """
    embed_dims: int = 256
    num_heads: int = 8
    num_levels: int = 4
    num_points: int = 4
    dropout: float = 0.1

    @nn.compact
    def __call__(self, query, value, reference_points, spatial_shapes, query_pos=None, deterministic=True):
        spatial_shapes = _static_shapes(spatial_shapes)
        m, lv, p, c = self.num_heads, self.num_levels, self.num_points, self.embed_dims
        assert c % m == 0 and len(spatial_shapes) == lv, (c, m, spatial_shapes, lv)
        assert reference_points.shape[-1] == 2, 'only 2-d (x, y) reference points are supported'
        identity = query
        if query_pos is not None:
            query = query + query_pos
        b, nq, _ = query.shape
        v = nn.Dense(c, kernel_init=xavier_uniform, name='value_proj')(value).reshape(b, -1, m, c // m)
        off = nn.Dense(m * lv * p * 2, kernel_init=nn.initializers.zeros,
                       bias_init=_constant_init(grid_init_bias(m, lv, p)),
                       name='sampling_offsets')(query).reshape(b, nq, m, lv, p, 2)
        logits = nn.Dense(m * lv * p, kernel_init=nn.initializers.zeros, name='attention_weights')(query)
        attn = jax.nn.softmax(logits.reshape(b, nq, m, lv * p), -1).reshape(b, nq, m, lv, p)
        normalizer = np.array([[w, h] for h, w in spatial_shapes], np.float32)  # (L, 2) = (W_l, H_l)
        ref = reference_points[:, :, None, :, None, :].astype(off.dtype)       # (B, Q, 1, L|1, 1, 2)
        loc = ref + off / normalizer[:, None, :].astype(off.dtype)
        out = ms_deform_attn(v, spatial_shapes, loc, attn)
        out = nn.Dense(c, kernel_init=xavier_uniform, name='output_proj')(out)
        out = nn.Dropout(self.dropout)(out, deterministic=deterministic)
        return out + identity, dict(sampling_locations=loc, attention_weights=attn)
