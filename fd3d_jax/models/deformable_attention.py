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
and processed in chunks (``lax.map`` forward, ``lax.scan`` backward, a ``jax.custom_vjp`` whose
residuals are the inputs), so no pass holds more than one chunk's corner taps; per chunk the forward
sums the weighted corner rows in one fused gather, the backward scatter-adds into one carried
d_value. ``ms_deform_attn_reference`` is the direct version, kept for tests and benchmarks. At
BEVFormer-Base SCA sizes (6 cameras x 40k BEV queries, 4 levels, P=8; inputs + output 1.2 GB)
XLA:CPU's ``memory_analysis()`` gives 0.001 / 0.005 GB of temp buffers for the chunked forward /
forward+backward, against 33 / 67 GB for the reference (``experiments/bench_msda.py --compile-only``).
Speed on the 2-core CPU against PyTorch's ``grid_sample`` formulation (mmcv's fallback) and against
the previous chunked core (taps gathered into a (rows, M, 4*L*P, Dh) buffer, then a batched dot; XLA
autodiff through a checkpointed chunk): see ``ms_deform_attn``.
"""
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fd3d_jax.data_parallel import on_data_shards, shard_index

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


def _check(value, spatial_shapes, sampling_locations, attention_weights, value_index=None):
    batch, value_len, num_heads, _ = value.shape
    assert value_len == sum(h * w for h, w in spatial_shapes), (value.shape, spatial_shapes)
    if value_index is None:
        assert sampling_locations.shape[0] == batch, (value.shape, sampling_locations.shape)
    else:
        assert value_index.shape == sampling_locations.shape[:2], (value_index.shape, sampling_locations.shape)
        assert jnp.issubdtype(value_index.dtype, jnp.integer), value_index.dtype
    assert sampling_locations.shape[2] == num_heads, (value.shape, sampling_locations.shape)
    assert sampling_locations.shape[3] == len(spatial_shapes) and sampling_locations.shape[-1] == 2, \
        (sampling_locations.shape, spatial_shapes)
    assert attention_weights.shape == sampling_locations.shape[:-1], (attention_weights.shape, sampling_locations.shape)


# ----------------------------------------------------------------------------------------------
# Reference: one level and one corner at a time, advanced indexing into (B, H, W, M, Dh).
# ----------------------------------------------------------------------------------------------

def ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights, value_index=None):
    """Direct MSDA (materialises every gathered corner). Same arguments/result as ``ms_deform_attn``."""
    spatial_shapes = _static_shapes(spatial_shapes)
    value, sampling_locations, attention_weights = map(jnp.asarray, (value, sampling_locations, attention_weights))
    _check(value, spatial_shapes, sampling_locations, attention_weights, value_index)
    batch, num_queries, num_heads, _, num_points, _ = sampling_locations.shape
    value_batch = value.shape[0]
    if value_index is None:
        bi = jnp.arange(batch)[:, None, None, None]                         # (B, 1, 1, 1)
    else:
        bi = jnp.asarray(value_index, jnp.int32)[:, :, None, None]          # (B, Q, 1, 1)
    mi = jnp.arange(num_heads)[None, None, :, None]                         # (1, 1, M, 1)
    out, start = 0.0, 0
    for lvl, (hh, ww) in enumerate(spatial_shapes):
        level_value = value[:, start:start + hh * ww].reshape(value_batch, hh, ww, num_heads, -1)
        start += hh * ww
        pix_w = sampling_locations[:, :, :, lvl, :, 0] * ww - 0.5           # (B, Q, M, P)
        pix_h = sampling_locations[:, :, :, lvl, :, 1] * hh - 0.5
        h0, w0 = jnp.floor(pix_h), jnp.floor(pix_w)
        lh, lw = pix_h - h0, pix_w - w0
        for dh, dw, corner in ((0, 0, (1 - lh) * (1 - lw)), (0, 1, (1 - lh) * lw),
                               (1, 0, lh * (1 - lw)), (1, 1, lh * lw)):
            row, col = h0 + dh, w0 + dw                                     # float corner coords
            inside = (row >= 0) & (row <= hh - 1) & (col >= 0) & (col <= ww - 1)
            row = jnp.clip(row, 0, hh - 1).astype(jnp.int32)
            col = jnp.clip(col, 0, ww - 1).astype(jnp.int32)
            tap = level_value[bi, row, col, mi]                             # (B, Q, M, P, Dh)
            wt = jnp.where(inside, corner, 0.0) * attention_weights[:, :, :, lvl]
            out = out + jnp.einsum('bqmp,bqmpd->bqmd', wt, tap)
    return out.reshape(batch, num_queries, -1).astype(value.dtype)


# ----------------------------------------------------------------------------------------------
# Production core: chunks of flattened (batch, query) rows; custom VJP.
# ----------------------------------------------------------------------------------------------

def default_chunk_bytes():
    """Chunk budget in bytes of gathered taps (rows * ``_row_bytes``; the backward holds a quarter of
    that per corner, the forward much less). On a 2-core CPU 4 and 8 MiB were within noise of each
    other and 3-5% faster than 16 MiB for forward+backward at the tiny TSA/SCA shapes; on
    accelerators a larger chunk (256 MiB, not measured here) keeps the number of sequential loop
    steps low."""
    return 8 * _MiB if jax.default_backend() == 'cpu' else 256 * _MiB


def _row_bytes(value, sampling_locations):
    """Bytes of gathered taps per flattened (batch, query) row."""
    _, _, num_heads, lv, num_points, _ = sampling_locations.shape
    return num_heads * lv * num_points * 4 * value.shape[-1] * max(jnp.dtype(value.dtype).itemsize, 4)


def choose_chunk(rows, row_bytes, chunk_bytes):
    """Rows per chunk for a ``chunk_bytes`` budget. Prefers the largest divisor of ``rows`` in
    [target / 2, target] (no padding: a pad copies the locations/weights and the output slice copies
    the result, which costs more memory than everything else at BEVFormer-Base), else the balanced
    ``ceil(rows / ceil(rows / target))`` with padding."""
    target = max(1, int(chunk_bytes) // int(row_bytes))
    if target >= rows:
        return rows
    for divisor in range(target, (target - 1) // 2, -1):
        if rows % divisor == 0:
            return divisor
    return -(-rows // -(-rows // target))


_DY = np.array([0, 0, 1, 1], np.int32).reshape(4, 1, 1, 1, 1)             # corner order: (0,0) (0,1)
_DX = np.array([0, 1, 0, 1], np.int32).reshape(4, 1, 1, 1, 1)             #               (1,0) (1,1)


def _geometry(spatial_shapes):
    """(L, 1) int32 heights, widths, level starts (offsets into S)."""
    heights = np.array([h for h, _ in spatial_shapes], np.int32)[:, None]
    widths = np.array([w for _, w in spatial_shapes], np.int32)[:, None]
    starts = np.cumsum([0] + [h * w for h, w in spatial_shapes])[:-1, None].astype(np.int32)
    return heights, widths, starts


def _pixel(loc, spatial_shapes):
    """loc (c, M, L, P, 2) -> pixel coordinates (pix_h, pix_w), each (c, M, L, P) in at least float32.
    Points with pix_h <= -1 or pix_h >= H sample nothing; clipping them to [-2, H + 1] keeps that (every
    corner stays outside) and keeps far-away coordinates within int32."""
    heights, widths, _ = _geometry(spatial_shapes)
    cdt = jnp.promote_types(loc.dtype, jnp.float32)
    pix_w = jnp.clip(loc[..., 0].astype(cdt) * widths.astype(cdt) - 0.5, -2.0, widths + 1.0)
    pix_h = jnp.clip(loc[..., 1].astype(cdt) * heights.astype(cdt) - 0.5, -2.0, heights + 1.0)
    return pix_h, pix_w


def _corner_indices(row_base, loc, spatial_shapes, num_heads):
    """Rows of the (B*S*M, Dh) value table under each bilinear corner: (4, c, M, L*P) int32.
    row_base (c,) = b * S of each row; corners outside the map are clipped in (their weight is 0)."""
    heights, widths, starts = _geometry(spatial_shapes)
    pix_h, pix_w = _pixel(loc, spatial_shapes)
    row = jnp.clip(jnp.floor(pix_h).astype(jnp.int32)[None] + _DY, 0, heights - 1)
    col = jnp.clip(jnp.floor(pix_w).astype(jnp.int32)[None] + _DX, 0, widths - 1)
    base = (row_base[:, None, None, None] + starts) * num_heads + jnp.arange(num_heads, dtype=jnp.int32)[:, None, None]
    idx = base + (row * widths + col) * num_heads
    return idx.reshape(idx.shape[:3] + (-1,))


def _bilinear(loc, spatial_shapes):
    """Per corner (4, c, M, L, P): ``inside`` (corner on the map), the row factor ``wy`` (1 - lh or
    lh) and the column factor ``wx`` (1 - lw or lw), in at least float32; the corner's bilinear
    weight is ``where(inside, wy * wx, 0)``."""
    heights, widths, _ = _geometry(spatial_shapes)
    pix_h, pix_w = _pixel(loc, spatial_shapes)
    h0, w0 = jnp.floor(pix_h), jnp.floor(pix_w)
    lh, lw = (pix_h - h0)[None], (pix_w - w0)[None]
    row = h0.astype(jnp.int32)[None] + _DY
    col = w0.astype(jnp.int32)[None] + _DX
    inside = (row >= 0) & (row < heights) & (col >= 0) & (col < widths)
    return inside, jnp.where(_DY == 0, 1 - lh, lh), jnp.where(_DX == 0, 1 - lw, lw)


def _corner_weights(loc, attn, spatial_shapes):
    """Bilinear corner weight times attention weight, 0 for corners outside the map:
    (4, c, M, L*P) in at least float32."""
    inside, wy, wx = _bilinear(loc, spatial_shapes)
    wts = jnp.where(inside, wy * wx, 0.0) * attn.astype(wy.dtype)[None]
    return wts.reshape(wts.shape[:3] + (-1,))


_SCATTER_ROWS = jax.lax.ScatterDimensionNumbers(update_window_dims=(3,), inserted_window_dims=(0,),
                                                scatter_dims_to_operand_dims=(0,))


def _rows(table, idx):
    """table (N, Dh), idx (...) int32 in [0, N) -> (..., Dh). ``lax.gather`` directly: ``table[idx]``
    adds a negative-index wrap that XLA:CPU recomputes for every gathered element."""
    dn = jax.lax.GatherDimensionNumbers(offset_dims=(idx.ndim,), collapsed_slice_dims=(0,), start_index_map=(0,))
    return jax.lax.gather(table, idx[..., None], dn, (1, table.shape[1]),
                          mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _corner_loop(body, init):
    """``fori_loop`` over the 4 bilinear corners. The loop boundary makes XLA materialise the corner
    indices and weights (computed outside) once per chunk; without it XLA:CPU fuses the index
    arithmetic into every gather/scatter and recomputes it for each of the Dh gathered elements
    (an ``optimization_barrier`` on them, the probe's fix, did not stop that with jax 0.10)."""
    return jax.lax.fori_loop(0, 4, body, init)


def _chunk_forward(table, row_base, loc, attn, spatial_shapes, num_heads):
    """One chunk: table (B*S*M, Dh), row_base (c,), loc (c, M, L, P, 2), attn (c, M, L, P) ->
    (c, M, Dh) in at least float32.

    Per corner, the L*P weighted row gathers are summed in one unrolled expression, which XLA:CPU
    emits as one loop fusion vectorised over Dh that writes only the (c, M, Dh) accumulator, instead
    of materialising (c, M, 4*L*P, Dh) taps and contracting them with a batched dot (the previous
    core), several times faster per chunk (docs/benchmarks.md). The result must stay (c, M, Dh) inside
    the fusion: viewing it as (c, M*Dh) there made XLA index every element separately (slower)."""
    idx = _corner_indices(row_base, loc, spatial_shapes, num_heads)
    wts = _corner_weights(loc, attn, spatial_shapes)
    acc = jnp.promote_types(table.dtype, wts.dtype)

    def corner(corner_id, out):
        corner_rows = jax.lax.dynamic_index_in_dim(idx, corner_id, keepdims=False)  # (c, M, L*P)
        corner_wts = jax.lax.dynamic_index_in_dim(wts, corner_id, keepdims=False)
        for point in range(idx.shape[-1]):
            out = out + corner_wts[:, :, point, None] * _rows(table, corner_rows[:, :, point]).astype(acc)
        return out

    return _corner_loop(corner, jnp.zeros(idx.shape[1:3] + (table.shape[1],), acc))


def _chunk_backward(table, d_table, row_base, loc, attn, cot, spatial_shapes, num_heads):
    """One chunk of the VJP: table, d_table (B*S*M, Dh); cot (c, M, Dh); the rest as
    ``_chunk_forward`` -> (d_table, d_loc (c, M, L, P, 2), d_attn (c, M, L, P)).

    Recomputes indices and weights; per corner, d_weights = <cot, tap> (a batched dot over the
    corner's gathered (c, M, L*P, Dh) taps: the fastest of dot, multiply+sum and per-point fused
    reductions, docs/benchmarks.md) and a scatter-add of weight * cot into the
    carried d_table (in place); then d_loc and d_attn by the bilinear formula, written out (the VJP
    of ``_corner_weights`` split into a dozen small fusions and reductions on XLA:CPU)."""
    heights, widths, _ = _geometry(spatial_shapes)
    idx = _corner_indices(row_base, loc, spatial_shapes, num_heads)
    inside, wy, wx = _bilinear(loc, spatial_shapes)                        # (4, c, M, L, P)
    attn_acc = attn.astype(wy.dtype)
    wts = (jnp.where(inside, wy * wx, 0.0) * attn_acc[None]).reshape(idx.shape)
    cot = cot.astype(wts.dtype)

    def corner(corner_id, carry):
        d_table, d_wts = carry
        corner_rows = jax.lax.dynamic_index_in_dim(idx, corner_id, keepdims=False)  # (c, M, L*P)
        wk = jax.lax.dynamic_index_in_dim(wts, corner_id, keepdims=False)
        taps = _rows(table, corner_rows).astype(wts.dtype)                 # (c, M, L*P, Dh)
        d_wts = jax.lax.dynamic_update_index_in_dim(d_wts, jnp.einsum('cmd,cmjd->cmj', cot, taps), corner_id, 0)
        d_table = jax.lax.scatter_add(d_table, corner_rows[..., None],
                                      (wk[..., None] * cot[:, :, None, :]).astype(d_table.dtype),
                                      _SCATTER_ROWS, mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)
        return d_table, d_wts

    d_table, d_wts = _corner_loop(corner, (d_table, jnp.zeros_like(wts)))
    d_corner = jnp.where(inside, d_wts.reshape(inside.shape), 0.0)         # (4, c, M, L, P)
    d_attn = sum(d_corner[k] * wy[k] * wx[k] for k in range(4))
    ey = (d_corner[2] - d_corner[0]) * wx[0] + (d_corner[3] - d_corner[1]) * wx[1]  # d / d lh (per unit attn)
    ex = (d_corner[1] - d_corner[0]) * wy[0] + (d_corner[3] - d_corner[2]) * wy[2]  # d / d lw
    d_loc = jnp.stack([ex * attn_acc * widths.astype(attn_acc.dtype), ey * attn_acc * heights.astype(attn_acc.dtype)],
                      -1)
    return d_table, d_loc.astype(loc.dtype), d_attn.astype(attn.dtype)


def _chunk_layout(batch, num_queries, chunk):
    rows = batch * num_queries
    nc = -(-rows // chunk)
    return rows, nc, nc * chunk - rows


def _to_chunks(array, rows, nc, pad):
    """(B, Q, ...) -> (nc, chunk, ...), zero rows padded at the end (attention 0: no output, no
    gradient)."""
    array = array.reshape((rows,) + array.shape[2:])
    if pad:
        array = jnp.pad(array, ((0, pad),) + ((0, 0),) * (array.ndim - 1))
    return array.reshape((nc, -1) + array.shape[1:])


def _from_chunks(array, batch, num_queries, rows):
    """(nc, chunk, ...) -> (B, Q, ...), padded rows dropped."""
    array = array.reshape((-1,) + array.shape[2:])
    if array.shape[0] != rows:
        array = array[:rows]
    return array.reshape((batch, num_queries) + array.shape[1:])


def _row_base(chunk_index, chunk, batch, num_queries, value_len, value_index=None):
    """(chunk,) first table row of each row's value element: its batch element's, or ``value_index``'s (the
    chunk's (chunk,) slice; padded rows read element 0 with attention 0)."""
    if value_index is not None:
        return value_index.astype(jnp.int32) * value_len
    ids = chunk_index * chunk + jnp.arange(chunk, dtype=jnp.int32)
    return jnp.minimum(ids // num_queries, batch - 1) * value_len          # padded rows -> last element


def _index_chunks(value_index, rows, nc, pad):
    """``value_index`` (B, Q) -> (nc, chunk) like the locations, or None."""
    return None if value_index is None else _to_chunks(value_index.astype(jnp.int32), rows, nc, pad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ms_deform_attn_chunked(spatial_shapes, chunk, value, sampling_locations, attention_weights, value_index):
    value_batch, value_len, num_heads, dh = value.shape
    batch, num_queries = sampling_locations.shape[:2]
    rows, nc, pad = _chunk_layout(batch, num_queries, chunk)
    table = value.reshape(value_batch * value_len * num_heads, dh)

    def step(args):
        chunk_index, loc, attn, index = args
        return _chunk_forward(table, _row_base(chunk_index, chunk, batch, num_queries, value_len, index), loc, attn,
                              spatial_shapes, num_heads)

    out = jax.lax.map(step, (jnp.arange(nc, dtype=jnp.int32), _to_chunks(sampling_locations, rows, nc, pad),
                             _to_chunks(attention_weights, rows, nc, pad),
                             _index_chunks(value_index, rows, nc, pad)))  # (nc, chunk, M, Dh)
    return _from_chunks(out, batch, num_queries, rows).reshape(batch, num_queries, num_heads * dh).astype(value.dtype)


def _ms_deform_attn_chunked_fwd(spatial_shapes, chunk, value, sampling_locations, attention_weights, value_index):
    out = _ms_deform_attn_chunked(spatial_shapes, chunk, value, sampling_locations, attention_weights, value_index)
    return out, (value, sampling_locations, attention_weights, value_index)


def _ms_deform_attn_chunked_bwd(spatial_shapes, chunk, residuals, cot):
    value, sampling_locations, attention_weights, value_index = residuals
    value_batch, value_len, num_heads, dh = value.shape
    batch, num_queries = sampling_locations.shape[:2]
    rows, nc, pad = _chunk_layout(batch, num_queries, chunk)
    table = value.reshape(value_batch * value_len * num_heads, dh)
    acc = jnp.promote_types(value.dtype, jnp.float32)

    def step(d_table, args):
        chunk_index, loc, attn, cot_chunk, index = args
        d_table, d_loc, d_attn = _chunk_backward(table, d_table,
                                                 _row_base(chunk_index, chunk, batch, num_queries, value_len, index),
                                                 loc, attn, cot_chunk, spatial_shapes, num_heads)
        return d_table, (d_loc, d_attn)

    xs = (jnp.arange(nc, dtype=jnp.int32), _to_chunks(sampling_locations, rows, nc, pad),
          _to_chunks(attention_weights, rows, nc, pad),
          _to_chunks(cot.reshape(batch, num_queries, num_heads, dh), rows, nc, pad),
          _index_chunks(value_index, rows, nc, pad))
    d_table, (d_loc, d_attn) = jax.lax.scan(step, jnp.zeros((value_batch * value_len * num_heads, dh), acc), xs)
    return (d_table.reshape(value.shape).astype(value.dtype), _from_chunks(d_loc, batch, num_queries, rows),
            _from_chunks(d_attn, batch, num_queries, rows), None)


_ms_deform_attn_chunked.defvjp(_ms_deform_attn_chunked_fwd, _ms_deform_attn_chunked_bwd)


def ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights, *, query_chunk=None,
                   chunk_bytes=None, value_index=None):
    """Memory-bounded MSDA, numerically equal to ``ms_deform_attn_reference``.

    value (B, S, M, Dh); spatial_shapes static ((H_l, W_l), ...); sampling_locations
    (B, Q, M, L, P, 2) normalised (x, y); attention_weights (B, Q, M, L, P) -> (B, Q, M*Dh) in
    ``value.dtype`` (accumulated in at least float32). Differentiable in all three arrays (reverse
    mode only: a ``jax.custom_vjp``).

    ``value_index`` (B', Q) int, optional: query row (b, q) reads value element ``value_index[b, q]`` in [0, B)
    instead of its own b; the locations and weights then have any batch B' (the sparse spatial
    cross-attention's (query, camera slot) rows reading their camera's features). Not differentiated.

    On a mesh with a ``data`` axis (``fd3d_jax.data_parallel``) each device runs the chunks of its own rows
    only: value, locations, weights (and ``value_index``) are split along their leading axis, and a row of
    shard k must read a value element of shard k (``value_index`` stays global; it is made shard-local here).
    Without this, XLA gathers every device's locations and weights and loops over the global batch on each.

    The B*Q (batch, query) rows are flattened (free reshapes, no transpose) and cut into chunks of
    ``query_chunk`` rows (default ``choose_chunk`` with ``chunk_bytes`` of gathered taps, default
    ``default_chunk_bytes()``); the rows are padded (and the output sliced) when the chunk does not
    divide B*Q. Value is read as a (B*S*M, Dh) row table. Forward: ``lax.map`` over chunks, each
    one fused gather-and-sum (``_chunk_forward``), nothing else kept. Backward: ``lax.scan`` over
    chunks recomputing the corners, scatter-adding into one carried d_value and emitting the chunk's
    d_loc, d_weights (``_chunk_backward``); the residuals are the three inputs.

    Why it is faster than the previous core (gather all taps into a (rows, M, 4*L*P, Dh) buffer,
    contract with a batched dot, XLA autodiff through a checkpointed chunk): XLA:CPU fused the corner
    index arithmetic into the gather and redid it for every gathered element, wrote and re-read
    P*4 times the output's size in taps, and ran the contraction as thousands of tiny batched
    matvecs; the backward recomputed all that and scatter-added taps whose indices and weights were
    again recomputed per element. The measurements (this core against the previous one and PyTorch's
    grid_sample) are in docs/benchmarks.md.
    """
    spatial_shapes = _static_shapes(spatial_shapes)
    value, sampling_locations, attention_weights = map(jnp.asarray, (value, sampling_locations, attention_weights))
    value_index = None if value_index is None else jnp.asarray(value_index)
    _check(value, spatial_shapes, sampling_locations, attention_weights, value_index)
    value_batch, value_len, num_heads, _ = value.shape
    assert value_batch * value_len * num_heads < 2 ** 31, 'int32 gather indices'

    def local(value, sampling_locations, attention_weights, value_index):   # one data shard (or everything)
        rows = sampling_locations.shape[0] * sampling_locations.shape[1]
        if query_chunk is None:
            chunk = choose_chunk(rows, _row_bytes(value, sampling_locations),
                                 default_chunk_bytes() if chunk_bytes is None else chunk_bytes)
        else:
            chunk = max(1, min(int(query_chunk), rows))
        if value_index is not None:   # global value rows -> this shard's (shard k holds rows k * local batch ...)
            value_index = value_index - shard_index() * value.shape[0]
        return _ms_deform_attn_chunked(spatial_shapes, chunk, value, sampling_locations, attention_weights,
                                       value_index)

    return on_data_shards(local, value, sampling_locations, attention_weights, value_index)


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

    ``dtype``: the value and output projections' compute dtype; the offsets and attention logits are computed in
    float32 (sampling locations and the softmax stay float32, ``fd3d_jax.models.precision``).
    """
    embed_dims: int = 256
    num_heads: int = 8
    num_levels: int = 4
    num_points: int = 4
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, query, value, reference_points, spatial_shapes, query_pos=None, deterministic=True):
        spatial_shapes = _static_shapes(spatial_shapes)
        num_heads, lv, num_points, embed_dims = self.num_heads, self.num_levels, self.num_points, self.embed_dims
        assert embed_dims % num_heads == 0 and len(spatial_shapes) == lv, (embed_dims, num_heads, spatial_shapes, lv)
        assert reference_points.shape[-1] == 2, 'only 2-d (x, y) reference points are supported'
        identity = query
        if query_pos is not None:
            query = query + query_pos
        batch, nq, _ = query.shape
        proj_value = nn.Dense(embed_dims, kernel_init=xavier_uniform, dtype=self.dtype, name='value_proj')(
            value).reshape(batch, -1, num_heads, embed_dims // num_heads)
        off = nn.Dense(num_heads * lv * num_points * 2, kernel_init=nn.initializers.zeros,
                       bias_init=_constant_init(grid_init_bias(num_heads, lv, num_points)), dtype=jnp.float32,
                       name='sampling_offsets')(query).reshape(batch, nq, num_heads, lv, num_points, 2)
        logits = nn.Dense(num_heads * lv * num_points, kernel_init=nn.initializers.zeros, dtype=jnp.float32,
                          name='attention_weights')(query)
        attn = jax.nn.softmax(logits.reshape(batch, nq, num_heads, lv * num_points), -1).reshape(
            batch, nq, num_heads, lv, num_points)
        normalizer = np.array([[w, h] for h, w in spatial_shapes], np.float32)  # (L, 2) = (W_l, H_l)
        ref = reference_points[:, :, None, :, None, :].astype(off.dtype)       # (B, Q, 1, L|1, 1, 2)
        loc = ref + off / normalizer[:, None, :].astype(off.dtype)
        out = ms_deform_attn(proj_value, spatial_shapes, loc, attn)
        out = nn.Dense(embed_dims, kernel_init=xavier_uniform, dtype=self.dtype, name='output_proj')(out)
        out = nn.Dropout(self.dropout)(out, deterministic=deterministic)
        return out + identity, dict(sampling_locations=loc, attention_weights=attn)
