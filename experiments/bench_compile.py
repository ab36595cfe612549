"""Where the train step's compile time goes, and what changes it.

    python experiments/bench_compile.py [--config bevformer_tiny:full] [--variants ...]

From abstract shapes only (``loop.abstract_train_step``: nothing initialised or run), at one sample per device, no
persistent compilation cache: the trace, lower and compile seconds (wall, and this process's CPU seconds) of
(1) the detector's forward in inference mode, (2) the training loss's value and gradient (forward with dropout,
detection loss with the Hungarian matcher, backward), (3) the whole train step (2 + gradient clipping and AdamW),
then of the train step under each variant: ``matcher_jax`` (``loss.matcher='jax'``), ``remat`` (layers and backbone
rematerialised), ``no_remat``, ``sparse_sca`` (``model.sca_max_cameras=2``), ``bfloat16`` (``model.dtype``). The
differences (2) - (1) and (3) - (2) are what the backward pass and the optimiser add.
"""
import argparse

import jax

from experiments import benchmark
from experiments.bench_memory import set_remat
from experiments.bench_train_step import aot_compile
from fd3d_jax.models import build
from fd3d_jax.train import loop
from fd3d_jax.train.train_step import make_loss_fn

VARIANTS = {
    'matcher_jax': ('loss.matcher', 'jax'),
    'remat': ('remat', True),
    'no_remat': ('remat', False),
    'sparse_sca': ('model.sca_max_cameras', 2),
    'bfloat16': ('model.dtype', 'bfloat16'),
}


def variant_config(spec, variant=None):
    """The config of ``spec`` at one sample per device, with ``variant`` applied."""
    _, config = benchmark.load_config(spec)
    config.train.batch_size = jax.device_count()
    if variant:
        key, value = VARIANTS[variant]
        if key == 'remat':
            set_remat(config, value)
        else:
            section, name = key.split('.')
            config[section][name] = value
    return config


def parts(config):
    """{part: (jitted function, abstract args)} of the forward, the loss gradient and the train step."""
    train_step, (state, expert_params, batch, rng) = loop.abstract_train_step(config, batch_size=jax.device_count())
    model = build(config.model)
    loss_fn = make_loss_fn(model, config)
    forward = jax.jit(lambda params, batch: model.apply({'params': params}, batch, deterministic=True))
    gradient = jax.jit(jax.value_and_grad(lambda params, batch, rng: loss_fn(params, None, batch, rng)[0]))
    return {'forward': (forward, (state.params['model'], batch)), 'loss_gradient': (gradient, (state.params, batch, rng)),
            'train_step': (train_step, (state, expert_params, batch, rng))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default='bevformer_tiny:full', help='NAME[:ARG] of a detector config')
    parser.add_argument('--variants', nargs='*', default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument('--out-dir', default=benchmark.RESULTS_DIR)
    parser.add_argument('--name', default='')
    args = parser.parse_args(argv)
    jax.config.update('jax_compilation_cache_dir', None)   # every figure is a real compile
    result = {'parts': {}, 'variants': {}}
    for part, (fn, fn_args) in parts(variant_config(args.config)).items():
        _, seconds = aot_compile(fn, *fn_args)
        result['parts'][part] = seconds
        print(f'{part}: {seconds}', flush=True)
    for variant in args.variants:
        fn, fn_args = parts(variant_config(args.config, variant))['train_step']
        _, seconds = aot_compile(fn, *fn_args)
        result['variants'][variant] = seconds
        print(f'train_step {variant}: {seconds}', flush=True)
    name = args.name or f'bench_compile_{benchmark.config_slug(args.config)}'
    return benchmark.write_result(name, dict(config=args.config, devices=jax.device_count(), **result), args.out_dir)


if __name__ == '__main__':
    main()
