"""numpy restatements of the original formulas (float64), used as test oracles.

Written from the PyTorch/CUDA sources' semantics, never from our JAX code.
"""
import numpy as np


def bilinear_sample(value, h, w):
    """mmcv ``ms_deform_attn_im2col_bilinear``: value (H, W, D) at pixel coords (h, w) = (y*H - .5,
    x*W - .5); skipped unless -1 < h < H and -1 < w < W; corners outside contribute 0."""
    height, width = value.shape[:2]
    if not (-1 < h < height and -1 < w < width):
        return np.zeros(value.shape[-1])
    h0, w0 = int(np.floor(h)), int(np.floor(w))
    lh, lw = h - h0, w - w0
    out = np.zeros(value.shape[-1])
    for dh, dw, wt in ((0, 0, (1 - lh) * (1 - lw)), (0, 1, (1 - lh) * lw), (1, 0, lh * (1 - lw)), (1, 1, lh * lw)):
        r, c = h0 + dh, w0 + dw
        if 0 <= r < height and 0 <= c < width:
            out += wt * value[r, c]
    return out


def msda(value, shapes, loc, weights):
    """Multi-scale deformable attention core. value (S, M, D) for one batch element, shapes
    [(H_l, W_l)], loc (Q, M, L, P, 2) normalised (x, y), weights (Q, M, L, P) -> (Q, M*D)."""
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    q, m, lv, p, _ = loc.shape
    out = np.zeros((q, m, value.shape[-1]))
    for l, (hh, ww) in enumerate(shapes):
        v = value[starts[l]:starts[l + 1]].reshape(hh, ww, m, -1)
        for qi in range(q):
            for mi in range(m):
                for pi in range(p):
                    x, y = loc[qi, mi, l, pi]
                    out[qi, mi] += weights[qi, mi, l, pi] * bilinear_sample(v[:, :, mi], y * hh - 0.5, x * ww - 0.5)
    return out.reshape(q, -1)


def dense(x, params):
    return x @ np.asarray(params['kernel'], np.float64) + np.asarray(params['bias'], np.float64)


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def point_sampling(ref_3d, pc_range, lidar2img, img_hw, eps=1e-5):
    """BEVFormer ``point_sampling`` for one sample. ref_3d (D, Q, 3), lidar2img (N, 4, 4) ->
    ref_cam (N, Q, D, 2), mask (N, Q, D)."""
    lo, hi = np.asarray(pc_range[:3]), np.asarray(pc_range[3:])
    pts = ref_3d * (hi - lo) + lo
    pts = np.concatenate([pts, np.ones(pts.shape[:-1] + (1,))], -1)
    cam = np.einsum('nij,dqj->nqdi', lidar2img, pts)
    mask = cam[..., 2] > eps
    uv = cam[..., :2] / np.maximum(cam[..., 2:3], eps)
    uv = uv / np.array([img_hw[1], img_hw[0]])
    mask &= (uv[..., 1] > 0) & (uv[..., 1] < 1) & (uv[..., 0] < 1) & (uv[..., 0] > 0)
    return np.nan_to_num(uv), mask


def sca_rebatch(params, query, feats, shapes, ref_cam, bev_mask, num_heads, num_points, num_z, count_mask=None):
    """BEVFormer ``SpatialCrossAttention.forward`` with its rebatching, for one batch element (dropout off).

    query (Q, C); feats (N, S, C); ref_cam (N, Q, D, 2); bev_mask (N, Q, D): the hit lists (the original takes
    batch element 0's for every element); count_mask (N, Q, D): the element's own mask the sum is divided by
    (``count = bev_mask.sum(-1) > 0`` per element; default ``bev_mask``); params: the flax module's params
    (names of fd3d_jax's SCA)."""
    inner = lambda name: params[f'deformable_attention_{name}']  # noqa: E731
    n, _, c = feats.shape
    lv = len(shapes)
    hits = [np.flatnonzero(bev_mask[i].any(-1)) for i in range(n)]
    max_len = max(len(h) for h in hits)
    slots = np.zeros_like(query)
    for cam in range(n):
        idx = hits[cam]
        q_re = np.zeros((max_len, c))
        r_re = np.zeros((max_len, num_z, 2))
        q_re[:len(idx)] = query[idx]
        r_re[:len(idx)] = ref_cam[cam, idx]
        value = dense(feats[cam], inner('value_proj')).reshape(-1, num_heads, c // num_heads)
        off = dense(q_re, inner('sampling_offsets')).reshape(max_len, num_heads, lv, num_points, 2)
        norm = np.array([[w, h] for h, w in shapes], np.float64)
        off = off / norm[None, None, :, None, :]
        off = off.reshape(max_len, num_heads, lv, num_points // num_z, num_z, 2)
        loc = (r_re[:, None, None, None, :, :] + off).reshape(max_len, num_heads, lv, num_points, 2)
        attn = softmax(dense(q_re, inner('attention_weights')).reshape(max_len, num_heads, lv * num_points))
        out = msda(value, shapes, loc, attn.reshape(max_len, num_heads, lv, num_points))
        slots[idx] += out[:len(idx)]
    count = np.maximum((bev_mask if count_mask is None else count_mask).any(-1).sum(0), 1)
    slots = slots / count[:, None]
    return dense(slots, params['output_proj']) + query


def tsa(params, query, query_pos, value, ref_hybrid, bev_hw, num_heads, num_points):
    """BEVFormer ``TemporalSelfAttention.forward`` for batch 1 (dropout off). query, query_pos (Q, C),
    value (2, Q, C) = [prev, cur], ref_hybrid (2, Q, 2)."""
    nq, c = query.shape
    q = np.concatenate([value[0], query + query_pos], -1)
    v = dense(value, params['value_proj']).reshape(2, nq, num_heads, c // num_heads)
    off = dense(q, params['sampling_offsets']).reshape(nq, num_heads, 2, 1, num_points, 2)
    attn = softmax(dense(q, params['attention_weights']).reshape(nq, num_heads, 2, num_points))
    outs = []
    for k in range(2):
        loc = ref_hybrid[k][:, None, None, None, :] + off[:, :, k] / np.array([bev_hw[1], bev_hw[0]])
        outs.append(msda(v[k], [tuple(bev_hw)], loc,
                         attn[:, :, k][:, :, None, :]))
    out = (outs[0] + outs[1]) / 2
    return dense(out, params['output_proj']) + query


def conv2d(x, kernel, bias=None, stride=1, pad=0, dil=1):
    """PyTorch Conv2d on (N, H, W, C) with an HWIO kernel, float64."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kernel = np.asarray(kernel, np.float64)
    kh, kw, _, cout = kernel.shape
    ho = (x.shape[1] - (dil * (kh - 1) + 1)) // stride + 1
    wo = (x.shape[2] - (dil * (kw - 1) + 1)) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, cout))
    for i in range(kh):
        for j in range(kw):
            out += x[:, i * dil:i * dil + stride * (ho - 1) + 1:stride,
                     j * dil:j * dil + stride * (wo - 1) + 1:stride] @ kernel[i, j]
    return out if bias is None else out + np.asarray(bias, np.float64)
