"""FLOP counting on the jaxpr, with loop bodies multiplied by their trip count.

XLA's ``cost_analysis()`` counts a while-loop body once, whatever its trip count, so it undercounts
code that scans (DCNv2 over kernel points, chunked deformable attention over query blocks). Here:
``dot_general`` = 2·M·N·K, ``conv_general_dilated`` = 2·out·(C_in/groups)·kernel, ``scan`` = length ×
body, ``while`` = body once (unknown trip count), ``cond`` = the costliest branch, and one FLOP per
output element of the arithmetic primitives below. ``macs`` counts the multiply-accumulates of dots
and convolutions only (the "FLOPs" of mmcv's counter, used by the published tables).
"""
import jax
import numpy as np
from jax.extend import core as jex_core

_ELEMENTWISE = {
    'add', 'sub', 'mul', 'div', 'max', 'min', 'neg', 'exp', 'log', 'log1p', 'tanh', 'logistic', 'sqrt',
    'rsqrt', 'pow', 'integer_pow', 'abs', 'sign', 'floor', 'ceil', 'round', 'erf', 'sin', 'cos', 'atan2',
    'select_n', 'reduce_sum', 'reduce_max', 'reduce_min', 'cumsum', 'exp2', 'square', 'erf_inv',
}


def _size(aval):
    return int(np.prod(aval.shape)) if hasattr(aval, 'shape') else 1


def _sub_jaxprs(eqn):
    for param in eqn.params.values():
        for item in (param if isinstance(param, (tuple, list)) else (param,)):
            if isinstance(item, jex_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex_core.Jaxpr):
                yield item


def _count(jaxpr):
    flops = macs = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == 'dot_general':
            (lc, _), (lb, _) = eqn.params['dimension_numbers']
            lhs = eqn.invars[0].aval.shape
            contract_size = int(np.prod([lhs[i] for i in lc]))
            eqn_macs = _size(eqn.outvars[0].aval) * contract_size
            macs += eqn_macs
            flops += 2 * eqn_macs
        elif name == 'conv_general_dilated':
            rhs = eqn.invars[1].aval.shape
            dn = eqn.params['dimension_numbers']
            spatial = int(np.prod([rhs[i] for i in dn.rhs_spec[2:]]))
            cin = rhs[dn.rhs_spec[1]]
            eqn_macs = _size(eqn.outvars[0].aval) * cin * spatial
            macs += eqn_macs
            flops += 2 * eqn_macs
        elif name == 'scan':
            sub_flops, mm = _count(eqn.params['jaxpr'].jaxpr)
            flops += eqn.params['length'] * sub_flops
            macs += eqn.params['length'] * mm
        elif name == 'cond':
            costs = [_count(b.jaxpr) for b in eqn.params['branches']]
            sub_flops, mm = max(costs)
            flops += sub_flops
            macs += mm
        elif name in _ELEMENTWISE:
            flops += sum(_size(v.aval) for v in eqn.outvars)
        else:
            for sub in _sub_jaxprs(eqn):
                sub_flops, mm = _count(sub)
                flops += sub_flops
                macs += mm
    return flops, macs


def count_flops(fn, *args, **kwargs):
    """(flops, macs) of ``fn(*args, **kwargs)``; arguments may be ``jax.ShapeDtypeStruct``s."""
    return _count(jax.make_jaxpr(fn, **kwargs)(*args).jaxpr)
