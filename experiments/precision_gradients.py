"""How far a bfloat16 gradient is from the float32 one, beside how far two float32 gradients with different
dropout draws are from each other (the step-to-step noise SGD already lives with).

    python experiments/precision_gradients.py [--config configs/bevformer_tiny.py:demo] [--batches 4]
        [--dataroot data/synthetic40 --version v1.0-trainval] [--config.key=value ...]

(the training split is ``train``, or ``mini_train`` for a ``v1.0-mini`` version; ``--dataroot None --version
None`` keep the config's, e.g. from ``--config.data.dataroot=DIR``).

At the same float32 params (a fresh init, seed 0), on the first ``--batches`` training batches (the training
pipeline, the config's seed), the detection loss's gradient in ``model.dtype`` float32 and bfloat16 with the same
dropout key, and in float32 with another dropout key. Per batch: both losses, the relative error
``|g_bf16 - g_f32| / |g_f32|`` and cosine of the whole gradient, the same two numbers for the other dropout draw;
per parameter kind (the last key: kernel, bias, scale, embeddings), the median and 90th percentile of the per-leaf
relative error of bfloat16.
A bfloat16 error well below the dropout spread says the rounding is not what makes bfloat16 training differ; a
kind far worse than the others (say, bias gradients summed over many positions in bfloat16) would show here.
Parameters whose float32 gradient is zero up to rounding (the attention key bias: softmax ignores a constant per
query) are reported apart (``zero_in_float32``: the largest gradient norm in each precision), since their relative
error is meaningless; frozen parameters (zero gradient in both) are left out.
"""
import argparse
import collections

import jax
import numpy as np

from experiments import benchmark
from experiments.bench_train_step import real_batches
from fd3d_jax.models import build
from fd3d_jax.train.train_step import make_loss_fn


def gradient_fn(config, dtype):
    loss_fn = make_loss_fn(build(config.model, dtype=dtype), config)
    return jax.jit(jax.value_and_grad(lambda params, batch, rng: loss_fn({'model': params}, None, batch, rng)[0]))


def relative(reference, other):
    """(relative error, cosine) of two flat float64 vectors."""
    norm = np.linalg.norm(reference)
    return float(np.linalg.norm(other - reference) / norm), float(reference @ other / norm / np.linalg.norm(other))


def flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(tree)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batches', type=int, default=4)
    parser.add_argument('--dataroot', default='data/synthetic40', help='None: the config\'s data.dataroot')
    parser.add_argument('--version', default='v1.0-trainval', help='None: the config\'s data.version')
    parser.add_argument('--out-dir', default=benchmark.RESULTS_DIR)
    args, config, name = benchmark.parse_config_args(parser, argv, 'configs/bevformer_tiny.py:demo')
    config.data.dataroot = config.data.dataroot if args.dataroot == 'None' else args.dataroot
    config.data.version = config.data.version if args.version == 'None' else args.version
    config.data.train_split = 'mini_train' if config.data.version.endswith('mini') else 'train'
    data = real_batches(config, config.data.dataroot, batch_size=1)
    batches = [next(data) for _ in range(args.batches)]
    params = jax.jit(build(config.model).init)({'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)},
                                               batches[0])['params']
    grad32, grad16 = gradient_fn(config, 'float32'), gradient_fn(config, 'bfloat16')
    rng, other_rng = jax.random.PRNGKey(3), jax.random.PRNGKey(4)
    per_batch, per_kind, zero = [], collections.defaultdict(list), collections.defaultdict(list)
    for index, batch in enumerate(batches):
        (loss32, g32), (loss16, g16), (loss_other, g_other) = (
            grad32(params, batch, rng), grad16(params, batch, rng), grad32(params, batch, other_rng))
        bf16_err, bf16_cos = relative(flat(g32), flat(g16))
        other_err, other_cos = relative(flat(g32), flat(g_other))
        per_batch.append(dict(loss_float32=float(loss32), loss_bfloat16=float(loss16),
                              loss_float32_other_dropout=float(loss_other), bfloat16_rel_error=bf16_err,
                              bfloat16_cosine=bf16_cos, other_dropout_rel_error=other_err,
                              other_dropout_cosine=other_cos))
        print(f'batch {index}: bfloat16 rel. error {bf16_err:.3f} (cos {bf16_cos:.4f}); float32 with another '
              f'dropout draw {other_err:.3f} (cos {other_cos:.4f})', flush=True)
        leaves16 = jax.tree_util.tree_leaves(g16)
        for (path, leaf32), leaf16 in zip(jax.tree_util.tree_flatten_with_path(g32)[0], leaves16):
            leaf32, leaf16 = np.asarray(leaf32, np.float64), np.asarray(leaf16, np.float64)
            key = jax.tree_util.keystr(path)
            norm32, norm16 = np.linalg.norm(leaf32), np.linalg.norm(leaf16)
            if norm16 == norm32 == 0:  # frozen (batch-norm statistics) or unused
                continue
            if norm32 < 1e-3 * norm16:  # zero up to rounding in float32
                zero[key].append((float(norm32), float(norm16)))
                continue
            per_kind[path[-1].key].append(float(np.linalg.norm(leaf16 - leaf32) / norm32))
    kinds = {kind: dict(leaves=len(errs), median=float(np.median(errs)), p90=float(np.percentile(errs, 90)))
             for kind, errs in sorted(per_kind.items())}
    for kind, stats in kinds.items():
        print(f'  {kind:18s} {stats["leaves"]:4d} leaf-batches  median {stats["median"]:.3f}  p90 {stats["p90"]:.3f}')
    summary = {key: np.median([b[key] for b in per_batch]).item()
               for key in ('bfloat16_rel_error', 'other_dropout_rel_error', 'bfloat16_cosine', 'other_dropout_cosine')}
    print('median over batches:', {k: round(v, 4) for k, v in summary.items()})
    return benchmark.write_result(f'precision_gradients_{benchmark.config_slug(name)}', dict(
        config=name, batches=args.batches, backend=jax.default_backend(), median=summary, per_batch=per_batch,
        per_kind=kinds, zero_in_float32={k: dict(float32_norm=max(n for n, _ in v), bfloat16_norm=max(n for _, n in v))
                         for k, v in zero.items()}), args.out_dir, echo=False)


if __name__ == '__main__':
    main()
