"""Fixtures of the distillation tests: the toy pairs' configs and random model outputs of the right shapes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fd3d_bevformer_base_to_tiny, fd3d_detr3d_r101_to_r50
from fd3d_jax.distill import make_distiller
from fd3d_jax.models import build
from fd3d_jax.models.inputs import dummy_batch

PAIRS = {'bevformer': fd3d_bevformer_base_to_tiny, 'detr3d': fd3d_detr3d_r101_to_r50}


def toy_config(kind, method='fd3d', **distill):
    """The ``:toy`` pair of ``kind`` with one frame; ``section__key=value`` sets ``config.distill.section.key``."""
    config = PAIRS[kind].get_config('toy')
    config.data.queue_length = 1
    config.distill.method = method
    for key, value in distill.items():
        if '__' in key:
            section, name = key.split('__')
            config.distill[section][name] = value
        else:
            config.distill[key] = value
    return config


def toy_batch(config):
    """A dummy batch (with the expert's keys) holding three GT boxes."""
    batch = dummy_batch(config, 1, expert_model=config.expert.model)
    boxes = [[5, 5, 0, 2, 4, 1.5, 0.3, 0, 0], [-10, 3, 0, 1, 1, 1.7, 0, 0, 0], [0, -20, 0, 2, 5, 2, 1, 0, 0]]
    batch['gt_boxes'][0, :3] = boxes
    batch['gt_labels'][0, :3] = [0, 8, 1]
    batch['gt_mask'][0, :3] = True
    return batch


def random_like(tree, seed):
    """Standard-normal floats (ones for integer leaves) of the shapes of ``tree``."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    rng = np.random.default_rng(seed)
    out = []
    for leaf in leaves:
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            out.append(jnp.asarray(rng.normal(size=leaf.shape), leaf.dtype))
        else:
            out.append(jnp.ones(leaf.shape, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


@pytest.fixture(scope='module', params=['bevformer', 'detr3d'])
def fake(request):
    """(kind, batch, apprentice outputs, expert outputs, expert params): both models' output shapes filled
    with random numbers, sampling locations in [0, 1]."""
    config = toy_config(request.param)
    distiller = make_distiller(config)
    batch = toy_batch(config)
    rngs = {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(0)}
    out = jax.eval_shape(lambda b: build(config.model).init_with_output(rngs, b)[0], batch)
    exp_out = jax.eval_shape(lambda b: distiller.expert.init_with_output(rngs, distiller.expert_batch(b))[0], batch)
    out, exp_out = random_like(out, 1), random_like(exp_out, 2)
    for layer_sampling in exp_out['sampling']:
        for key in ('sampling_locations', 'points'):
            if key in layer_sampling:
                layer_sampling[key] = jax.nn.sigmoid(layer_sampling[key])
    return request.param, batch, out, exp_out, random_like(distiller.expert_abstract_params, 3)
