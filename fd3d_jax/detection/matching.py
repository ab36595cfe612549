"""Hungarian matching of queries to GT boxes (``HungarianAssigner3D`` of BEVFormer/DETR3D).

Cost per decoder layer and sample: ``FocalLossCost(weight=2)`` on the class logits plus
``BBox3DL1Cost(weight=0.25)`` on the first 8 box-code entries (velocity excluded). The
assignment is solved exactly by one of two matchers (``config.loss.matcher``, ``MATCHERS``):

* ``'scipy'`` (``hungarian``): ``scipy.optimize.linear_sum_assignment`` on the host through
  ``jax.pure_callback``; padded GT columns are sliced out on the host.
* ``'jax'`` (``hungarian_jax``): the same optimal assignment computed in the graph (shortest augmenting
  paths with potentials, static shapes, ``lax`` loops): no host round trip, so a TPU/GPU step does not
  stall on the host.

GT is padded to a static G with a mask.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from fd3d_jax.data_parallel import data_axis_size, on_data_shards
from fd3d_jax.models.box_coder import normalize_bbox

# Replaces NaN/inf costs before scipy (which rejects them): such pairs are matched last.
_BIG_COST = 1e10
# The values of ``config.loss.matcher`` ('auto': ``resolve_matcher``).
MATCHERS = ('auto', 'scipy', 'jax')


def _cpu_mesh():
    """Whether this traces for several CPU devices (a ``data`` axis of more than one)."""
    return jax.default_backend() == 'cpu' and data_axis_size() > 1


def resolve_matcher(matcher):
    """``'auto'`` -> ``'jax'`` on accelerators (no host round trip per step; a step without a host callback can be
    kept in the persistent compilation cache) and on a mesh of several CPU devices (see ``assign``), ``'scipy'``
    on one CPU device (there the callback costs no transfer, and every earlier CPU result was matched by it);
    ``'scipy'`` / ``'jax'`` as they are."""
    if matcher == 'auto':
        return 'scipy' if jax.default_backend() == 'cpu' and data_axis_size() == 1 else 'jax'
    return matcher


def focal_cost(cls_logits, gt_labels, weight=2.0, alpha=0.25, gamma=2.0, eps=1e-12):
    """Focal classification cost (mmdet ``FocalLossCost``).

    Args:
      cls_logits: (..., Q, K) logits; gt_labels: (..., G) int, padding (-1) allowed (its column
        holds an arbitrary finite value and must be masked by the caller).
    Returns:
      (..., Q, G): ``weight * (pos - neg)[q, label_g]`` with ``p = sigmoid(logits)``,
      ``pos = -log(p + eps) alpha (1 - p)^gamma``, ``neg = -log(1 - p + eps) (1 - alpha) p^gamma``.
    """
    prob = jax.nn.sigmoid(cls_logits)
    neg = -jnp.log(1.0 - prob + eps) * (1.0 - alpha) * prob ** gamma
    pos = -jnp.log(prob + eps) * alpha * (1.0 - prob) ** gamma
    cost = weight * (pos - neg)
    labels = jnp.clip(gt_labels, 0, cls_logits.shape[-1] - 1)
    idx = jnp.broadcast_to(labels[..., None, :], cost.shape[:-1] + labels.shape[-1:])
    return jnp.take_along_axis(cost, idx, axis=-1)


def l1_cost(bbox_pred, gt_code, weight=0.25):
    """Box L1 cost (``BBox3DL1Cost``): ``weight * cdist_L1`` over the first 8 code entries.

    bbox_pred: (..., Q, 10) code; gt_code: (..., G, 10) normalised GT. Returns (..., Q, G).
    """
    diff = bbox_pred[..., :, None, :8] - gt_code[..., None, :, :8]
    return weight * jnp.sum(jnp.abs(diff), axis=-1)


def _assign_host(cost, gt_mask):
    """Numpy: cost (..., Q, G), gt_mask (..., G) -> assigned (..., Q) int32, -1 unmatched."""
    cost = np.asarray(cost, np.float64)
    gt_mask = np.broadcast_to(np.asarray(gt_mask, bool), cost.shape[:-2] + cost.shape[-1:])
    num_queries, num_gt = cost.shape[-2:]
    flat_cost, flat_mask = cost.reshape(-1, num_queries, num_gt), gt_mask.reshape(-1, num_gt)
    out = np.full((flat_cost.shape[0], num_queries), -1, np.int32)
    for sample in range(flat_cost.shape[0]):
        cols = np.flatnonzero(flat_mask[sample])  # slice padded GT out ("slicer")
        if cols.size == 0 or num_queries == 0:
            continue
        sample_cost = np.nan_to_num(flat_cost[sample][:, cols], nan=_BIG_COST, posinf=_BIG_COST, neginf=-_BIG_COST)
        rows, sel = scipy.optimize.linear_sum_assignment(sample_cost)
        out[sample, rows] = cols[sel]
    return out.reshape(cost.shape[:-1])


def hungarian(cost, gt_mask):
    """Optimal one-to-one assignment per sample, on the host (``linear_sum_assignment``).

    Works under ``jit`` and ``vmap`` (``vmap_method='broadcast_all'``: one host call for the whole vmapped
    batch). Under ``jit`` over several devices the callback receives the whole batch on one device unless it is
    called through ``assign`` (one call per device). On accelerators prefer the in-graph ``hungarian_jax``
    (``config.loss.matcher='jax'``, the default there): host callbacks stall the devices.

    Args:
      cost: (..., B, Q, G) matching cost; non-finite entries are replaced by a large finite cost.
      gt_mask: (..., B, G) bool, False for padded GT (those columns are ignored).
    Returns:
      (..., B, Q) int32: index of the GT matched to each query, -1 if unmatched (every valid GT is
      matched when Q >= number of valid GT). No gradient.
    """
    cost = jax.lax.stop_gradient(cost)
    out_shape = jax.ShapeDtypeStruct(cost.shape[:-1], jnp.int32)
    assigned = jax.pure_callback(_assign_host, out_shape, cost, gt_mask, vmap_method='broadcast_all')
    return jax.lax.stop_gradient(assigned)


def _first_argmin(x, axis=-1):
    """(min, index of its first occurrence) over ``axis``, as two plain reductions (XLA:CPU runs
    ``jnp.argmin``'s variadic reduction ~5x slower); x has no NaN."""
    n = x.shape[axis]
    low = jnp.min(x, axis=axis, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis % x.ndim)
    index = jnp.min(jnp.where(x == low, iota, n), axis=axis)
    return jnp.squeeze(low, axis), jnp.minimum(index, n - 1)


def _lsap_one(cost, gt_mask):
    """``hungarian_jax`` of one sample: cost (Q, G), gt_mask (G,) -> (Q,) int32.

    Rows of the solved problem are the GT (rows of ``cost.T``), columns the queries plus
    ``D = max(0, G - Q)`` zero-cost dummy columns (static), of which only the first ``max(0, G_valid - Q)``
    are active, plus one virtual column (index ``virtual``) that roots the search tree. Every valid row is then
    assigned to a distinct active column: ``min(Q, G_valid)`` rows get a query, the rest a dummy
    (unmatched), and the total cost of the real pairs is minimal.
    """
    num_q, num_g = cost.shape
    if num_q == 0 or num_g == 0:
        return jnp.full((num_q,), -1, jnp.int32)
    num_dummy = max(0, num_g - num_q)
    virtual = num_q + num_dummy                   # the real columns come first; this index is the virtual one
    valid = gt_mask.astype(bool)
    num_valid = jnp.sum(valid.astype(jnp.int32))
    pairs = jnp.minimum(num_q, num_valid).astype(jnp.float32)
    dummies = jnp.maximum(num_valid - num_q, 0)  # active dummy columns

    work = jax.lax.stop_gradient(cost).astype(jnp.float32)            # (Q, G)
    finite = jnp.isfinite(work) & valid
    any_finite = jnp.any(finite)
    lo = jnp.where(any_finite, jnp.min(jnp.where(finite, work, jnp.inf)), 0.0)
    hi = jnp.where(any_finite, jnp.max(jnp.where(finite, work, -jnp.inf)), 0.0)
    spread = hi - lo
    # Shift to [0, spread] (every complete assignment has the same number of pairs, so the argmin is
    # unchanged) and replace NaN/+inf by +big, -inf by -big: big > pairs * spread, so (as scipy's 1e10 in
    # float64) the number of non-finite pairs is minimised first, then the finite cost; a problem-sized big
    # keeps float32's resolution for the finite costs.
    big = jnp.minimum((pairs + 1.0) * (spread + 1.0), 1e30)
    work = jnp.clip(jnp.where(finite, work - lo, jnp.where(work == -jnp.inf, -big, big)), -big, big)
    work = jnp.where(valid, work, 0.0)
    active = jnp.arange(virtual + 1) < num_q + dummies  # queries + needed dummies, not the virtual column

    gt_rows = work.T                              # (G, Q): one contiguous row per Dijkstra step

    def row_costs(row):                           # (virtual + 1,) costs of one GT row: queries, dummies, virtual
        return jnp.concatenate([gt_rows[row], jnp.zeros(num_dummy + 1, jnp.float32)])

    # Warm start (the column-reduction idea of Jonker-Volgenant): u_i = min_j c_ij, col_pot = 0 is dual feasible;
    # every row that is the first to claim its cheapest column is matched there (a tight pair). Only the
    # rows left over are augmented below (with 900 queries, most GT have a distinct cheapest query).
    row_min, best = _first_argmin(work, axis=0)                            # (G,) over the queries
    use_dummy = (dummies > 0) & (row_min > 0.0)   # a dummy (cost 0, after the queries) is cheaper
    best = jnp.where(use_dummy, num_q, best)
    row_min = jnp.where(use_dummy, 0.0, row_min)
    rows = jnp.arange(num_g, dtype=jnp.int32)
    claim = jnp.full(virtual + 1, num_g, jnp.int32).at[jnp.where(valid, best, virtual)].min(rows)
    first = valid & (claim[best] == rows)
    owner = jnp.where(claim < num_g, claim, -1).at[virtual].set(-1)       # owner[col]: the row of a column, -1 free
    row_pot = jnp.where(valid, row_min, 0.0)
    col_pot = jnp.zeros(virtual + 1, jnp.float32)
    todo = valid & ~first
    num_todo = jnp.sum(todo.astype(jnp.int32))
    todo_rows = jnp.nonzero(todo, size=num_g, fill_value=0)[0].astype(jnp.int32)

    def augment_row(state):
        step, row_pot, col_pot, owner = state
        row = todo_rows[step]
        owner = owner.at[virtual].set(row)
        live = step < num_todo                       # false for a vmapped sample that is done: no wasted search

        def searching(carry):
            col0, steps = carry[-2:]
            return live & (owner[col0] >= 0) & (steps <= virtual)

        def dijkstra_step(carry):                     # one column joins the shortest-path tree
            used, row_used, minv, way, row_pot, col_pot, col0, steps = carry
            row0 = owner[col0]
            used = used.at[col0].set(True)
            row_used = row_used.at[row0].set(True)
            reduced = row_costs(row0) - row_pot[row0] - col_pot
            better = ~used & (reduced < minv)
            minv = jnp.where(better, reduced, minv)
            way = jnp.where(better, col0, way)
            cand = jnp.where(~used & active, minv, jnp.inf)
            delta, col1 = _first_argmin(cand)
            row_pot = jnp.where(row_used, row_pot + delta, row_pot)
            col_pot = jnp.where(used, col_pot - delta, col_pot)
            minv = jnp.where(used, minv, minv - delta)
            return used, row_used, minv, way, row_pot, col_pot, col1, steps + 1

        init = (jnp.zeros(virtual + 1, bool), jnp.zeros(num_g, bool), jnp.full(virtual + 1, jnp.inf, jnp.float32),
                jnp.full(virtual + 1, virtual, jnp.int32), row_pot, col_pot, jnp.int32(virtual), jnp.int32(0))
        _, _, _, way, row_pot, col_pot, j_free, _ = jax.lax.while_loop(searching, dijkstra_step, init)

        def flip(carry):                              # augment along the path: j_free <- ... <- virtual
            owner, col0 = carry
            col1 = way[col0]
            return owner.at[col0].set(owner[col1]), col1

        owner, _ = jax.lax.while_loop(lambda carry: carry[1] != virtual, flip, (owner, j_free))
        return step + 1, row_pot, col_pot, owner

    _, _, _, owner = jax.lax.while_loop(lambda carry: carry[0] < num_todo, augment_row,
                                        (jnp.int32(0), row_pot, col_pot, owner))
    return owner[:num_q]


def hungarian_jax(cost, gt_mask):
    """Optimal one-to-one assignment per sample, in the graph: the same contract and result (up to ties)
    as ``hungarian``, without a host callback (pure JAX: ``jit``, ``vmap`` and any backend).

    Algorithm: the shortest-augmenting-path Hungarian method with dual potentials (Kuhn-Munkres in the
    Jonker-Volgenant / ``e-maxx`` form, the family of scipy's ``linear_sum_assignment``), rows = GT,
    columns = queries. A warm start (JV's column reduction) sets ``u_i = min_j c_ij``, ``v = 0`` and
    matches every GT that is first to claim its cheapest query; the other valid GT are then added one at a
    time (``while_loop``; padded GT never enter): each addition grows a Dijkstra tree over the columns on
    the reduced costs ``c_ij - u_i - v_j`` (``while_loop``, one vectorised (Q,) sweep per step) until it
    reaches a free query, updates the potentials by the tree's distances and flips the path. Time
    O(G_valid^2 Q) worst case (each augmentation at most G_valid + 1 sweeps of O(Q)), ~O(G Q) when the
    paths are short (the usual case: 900 queries, measured in docs/benchmarks.md), plus O(Q G) elementwise
    set-up; memory O(Q G). With G_valid > Q, zero-cost dummy columns (G - Q static, as many active as
    needed) make every query matched and leave min(Q, G_valid) real pairs, as scipy does for a
    rectangular matrix.

    Why it is exact (not an approximation such as an auction with epsilon): the potentials stay dual
    feasible (``u_i + v_j <= c_ij`` for every valid row and active column) and tight on every matched
    pair (complementary slackness); the warm start and each augmentation keep both, and at the end every
    valid GT row is matched, so by LP duality for the assignment polytope the matching is optimal. In
    float32 the reduced costs carry rounding errors of a few ulps of the potentials (of the order of the
    cost spread, after shifting the costs to start at 0), so the total cost is optimal up to float32
    rounding: relative gaps to scipy's float64 optimum <= 1e-8 were measured on near-tied costs, the tests
    require 1e-5; costs that float32 holds exactly (e.g. small integers, ties included) are solved exactly.
    Among equal-cost assignments it may pick another one than scipy.

    Non-finite costs: NaN and +inf become +big, -inf -big, with big = (min(Q, G_valid) + 1) * (spread of
    the finite valid costs + 1) (capped at 1e30), so the number of non-finite pairs is minimised first
    and then the finite cost, as scipy's ``_BIG_COST`` in float64 does. A fixed 1e10 would leave float32
    no resolution for the finite costs once a potential reaches it; with the problem-sized big the finite
    part is resolved to ~1e-7 of big (about 1e-3 for 200 GT and a spread of 50) where a potential reaches
    big, to float32 rounding of the costs elsewhere.

    Args:
      cost: (..., B, Q, G) matching cost (any float dtype; solved in float32).
      gt_mask: (..., B, G) bool, False for padded GT (those columns are ignored, wherever they are).
    Returns:
      (..., B, Q) int32: index of the GT matched to each query, -1 if unmatched (every valid GT is matched when
      Q >= number of valid GT, every query otherwise). No gradient.
    """
    cost = jax.lax.stop_gradient(cost)
    gt_mask = jnp.broadcast_to(gt_mask, cost.shape[:-2] + cost.shape[-1:])
    num_q, num_g = cost.shape[-2:]
    problems = math.prod(cost.shape[:-2])
    assigned = jax.vmap(_lsap_one)(cost.reshape(problems, num_q, num_g), gt_mask.reshape(problems, num_g))
    return jax.lax.stop_gradient(assigned.reshape(cost.shape[:-1]))


def assign(cost, gt_mask, matcher='scipy'):
    """``hungarian`` (``matcher='scipy'``, host callback) or ``hungarian_jax`` (``'jax'``, in the graph; ``'auto'``:
    ``resolve_matcher``):
    cost (..., B, Q, G), gt_mask (B, G) -> (..., B, Q) int32, -1 unmatched (leading axes, e.g. decoder layers,
    are matched independently).

    On a mesh with a ``data`` axis each device matches its own samples (``fd3d_jax.data_parallel``): the scipy
    callback then runs once per device on that device's rows (instead of the whole cost gathered onto one
    device), and the in-graph matcher's loops stop on their own shard's samples (instead of a flag reduced over
    every device at each iteration). Exception: scipy on a mesh of several CPU devices runs once on the whole
    batch, as per-device callbacks deadlock there (below); ``'auto'`` takes the in-graph matcher on such a mesh."""
    if matcher not in MATCHERS:
        raise ValueError(f'matcher must be one of {MATCHERS}, got {matcher!r}')
    gt_mask = jnp.broadcast_to(gt_mask, cost.shape[:-2] + cost.shape[-1:])
    solve = hungarian if resolve_matcher(matcher) == 'scipy' else hungarian_jax
    if solve is hungarian and _cpu_mesh():
        # One callback on the whole batch: JAX places a callback's inputs on CPU device 0, which on a CPU mesh is
        # itself one of the devices running the step; with one callback per device, device 0 busy in its own
        # call never serves the others' and the step hangs (seen with 8 simulated devices at 900 x 256).
        return hungarian(cost, gt_mask)
    batch_axis = cost.ndim - 3
    return on_data_shards(solve, cost, gt_mask, in_axes=batch_axis, out_axes=batch_axis)


def match_cost(cls_logits, bbox_preds, gt_boxes, gt_labels, gt_mask, cls_weight=2.0, bbox_weight=0.25,
               alpha=0.25, gamma=2.0):
    """The matching cost of ``match``: (B, Q, G) focal + L1 cost, padded GT columns 0, no gradient (arguments
    as ``match``)."""
    cls_logits, bbox_preds = jax.lax.stop_gradient((cls_logits, bbox_preds))
    valid = gt_mask[..., None]
    # Padded rows are zeros (log 0 = -inf): give them a harmless box before coding.
    safe_boxes = jnp.where(valid, gt_boxes, jnp.ones_like(gt_boxes))
    gt_code = jnp.where(valid, normalize_bbox(safe_boxes), 0.0)
    cost = (focal_cost(cls_logits, gt_labels, cls_weight, alpha, gamma)
            + l1_cost(bbox_preds, gt_code, bbox_weight))
    return jnp.where(gt_mask[..., None, :], cost, 0.0)


def match(cls_logits, bbox_preds, gt_boxes, gt_labels, gt_mask, cls_weight=2.0, bbox_weight=0.25,
          alpha=0.25, gamma=2.0, matcher='scipy'):
    """Hungarian assignment of one decoder layer (``HungarianAssigner3D.assign``, per sample).

    Args:
      cls_logits: (B, Q, K); bbox_preds: (B, Q, 10) code with metric centres.
      gt_boxes: (B, G, 9) ``(x, y, z_gravity, w, l, h, yaw, vx, vy)``; gt_labels: (B, G) int
        (-1 padding); gt_mask: (B, G) bool.
      matcher: ``'scipy'`` (host callback) or ``'jax'`` (in the graph); see ``assign``.
    Returns:
      (B, Q) int32 matched GT index per query, -1 for background.
    """
    cost = match_cost(cls_logits, bbox_preds, gt_boxes, gt_labels, gt_mask, cls_weight, bbox_weight, alpha, gamma)
    return assign(cost, gt_mask, matcher)
