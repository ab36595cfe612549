"""The image backbone's repeated blocks as a loop vs unrolled (``model.backbone.repeated_blocks``): forward and gradient.

    python experiments/bench_backbone.py [--config bevformer_tiny:full] [--iters 3] [--warmup 1]
        [--variants loop unrolled]

The config's ResNet (its ``model.backbone``: depth, frozen stages, DCN, remat) on one sample's cameras at the
config's padded image size (``num_cams`` x H x W x 3, random images). Per variant (``loop``: each stage's
repeated blocks as one ``lax.scan`` loop, ``unrolled``: the same scan fully unrolled; same parameters), two
jitted functions, each compiled ahead of time: the forward (the mean of the backbone's outputs) and its
gradient with respect to the parameters (what the train step differentiates; frozen stages stop it), whether the
compiled program has a loop, and the two gradients' largest difference (relative to the largest gradient; the
same computation). Then the calls timed round robin (``benchmark.interleaved``), and per function loop over
unrolled.

Why: on XLA:CPU the backward convolutions in a loop body keep non-canonical dimension orders and fall to the
naive convolution emitter (``fd3d_jax/models/backbone.py``); the forward is unaffected.
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchmark
from experiments.bench_train_step import aot_compile
from fd3d_jax.models.backbone import ResNet
from fd3d_jax.models.inputs import image_hw

VARIANTS = ('loop', 'unrolled')


def backbone_functions(config, repeated_blocks):
    """``(params, forward, gradient)`` of the config's ResNet with ``repeated_blocks``: both functions take
    ``(params, images)`` and are jitted; params from ``init`` at the config's seed (identical across variants)."""
    model = ResNet(**{**dict(config.model.backbone), 'repeated_blocks': repeated_blocks})
    height, width = image_hw(config)
    params = model.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, height, width, 3)))

    def forward(params, images):
        return sum(feat.astype(jnp.float32).mean() for feat in model.apply(params, images))

    return params, jax.jit(forward), jax.jit(jax.grad(forward))


def compare(config, variants, iters, warmup):
    """Compile seconds, XLA's peak bytes and interleaved times of the forward and the gradient per variant."""
    height, width = image_hw(config)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(config.model.num_cams, height, width, 3)),
                         jnp.float32)
    entry, calls, gradients = {'images': list(images.shape)}, {}, {}
    for variant in variants:
        params, forward, gradient = backbone_functions(config, variant)
        for function, jitted in (('forward', forward), ('gradient', gradient)):
            compiled, seconds = aot_compile(jitted, params, images)
            peak = benchmark.memory(compiled)['peak']
            entry[f'{variant}/{function}'] = dict(compile_s=seconds, peak_bytes=peak,
                                                  loop_in_program='while(' in compiled.as_text())
            print(f'  {variant} {function}: compile {seconds["total"]} s, peak {peak / 2**30:.2f} GiB', flush=True)
            calls[f'{variant}/{function}'] = (lambda c=compiled, p=params: jax.block_until_ready(c(p, images)))
        gradients[variant] = calls[f'{variant}/gradient']()
    if len(gradients) == 2:   # the same computation: the largest gradient difference against the largest gradient
        first, second = gradients.values()
        differences = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: jnp.max(jnp.abs(a - b)), first, second))
        scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree_util.tree_leaves(first))
        entry['gradient_max_difference'] = float(max(differences)) / scale if scale else 0.0
    times = entry['times'] = benchmark.interleaved(calls, warmup=warmup, iters=iters, progress=True)
    if {'loop', 'unrolled'} <= set(variants):
        entry['loop_over_unrolled'] = {f: round(times[f'loop/{f}']['median_ms'] / times[f'unrolled/{f}']['median_ms'], 2)
                                       for f in ('forward', 'gradient')}
        print(f"  loop / unrolled {entry['loop_over_unrolled']}", flush=True)
    return entry


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default='bevformer_tiny:full', help='NAME:ARG of a detector config')
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument('--iters', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--out-dir', default=benchmark.RESULTS_DIR)
    parser.add_argument('--name', default=None, help='result name (default bench_backbone_<config>)')
    args = parser.parse_args(argv)
    name, config = benchmark.load_config(args.config)
    print(name, flush=True)
    result = dict(config=name, backbone=dict(config.model.backbone), backend=jax.default_backend(),
                  **compare(config, args.variants, args.iters, args.warmup))
    return benchmark.write_result(args.name or f'bench_backbone_{benchmark.config_slug(args.config)}', result,
                                  args.out_dir)


if __name__ == '__main__':
    main()
