"""Data demo: records, a pipeline batch, devkit evaluation of GT-as-predictions, pictures.

    python experiments/data_demo.py --config configs/data.py:toy --out data/demo \
        [--config.data.dataroot=data/synthetic ...]

Checks that the synthetic set runs through the whole data path that training uses: devkit ->
records -> grain batches, and model-format boxes -> results JSON -> DetectionEval.
"""
import os
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from fd3d_jax import nuscenes_metrics, visualize
from fd3d_jax.data import pipeline, records

config_flags.DEFINE_config_file('config', 'configs/data.py:toy', 'data config')
flags.DEFINE_string('out', 'data/demo', 'output folder')
flags.DEFINE_integer('pictures', 3, 'pictures to render')
FLAGS = flags.FLAGS


def perturbed(detections, rng, shift=0.5):
    """Detections with centres moved by ``shift`` metres in a random direction and sizes by 10%."""
    out = {}
    for token, dets in detections.items():
        out[token] = []
        for d in dets:
            d = dict(d)
            ang = rng.uniform(0, 2 * np.pi)
            d['translation'] = (np.asarray(d['translation']) + [shift * np.cos(ang), shift * np.sin(ang), 0]).tolist()
            d['size'] = (np.asarray(d['size']) * rng.uniform(0.9, 1.1, 3)).tolist()
            out[token].append(d)
    return out


def main(argv):
    del argv
    cfg = FLAGS.config.data
    t = time.time()
    where = dict(records_dir=cfg.records_dir, can_bus_root=cfg.can_bus_root, can_bus_from_poses=cfg.can_bus_from_poses)
    train = records.get_records(cfg.dataroot, cfg.version, cfg.train_split, **where)
    val = records.get_records(cfg.dataroot, cfg.version, cfg.val_split, **where)
    print(f'records: {len(train["samples"])} train / {len(val["samples"])} val samples ({time.time() - t:.1f} s)')

    t = time.time()
    batch = next(iter(pipeline.train_dataset(train, cfg.dataroot, cfg, batch_size=2, seed=0)))
    print(f'training batch ({time.time() - t:.2f} s):')
    for key, value in batch.items():
        print(f'  {key:16s} {str(value.shape):28s} {value.dtype}')

    class_names = tuple(cfg.class_names)
    gt = nuscenes_metrics.gt_as_detections(val, class_names)
    rng = np.random.default_rng(0)
    for name, dets in (('gt_as_predictions', gt), ('gt_shifted_0.5m', perturbed(gt, rng))):
        path = os.path.join(FLAGS.out, name, 'results.json')
        nuscenes_metrics.write_results(nuscenes_metrics.results_json(val, dets), path)
        summary = nuscenes_metrics.run_detection_eval(path, cfg.dataroot, cfg.version, cfg.val_split,
                                              os.path.dirname(path))
        print(f'\n{name} on {cfg.val_split} (devkit DetectionEval, {nuscenes_metrics.EVAL_CONFIG}):')
        print(nuscenes_metrics.format_metrics(summary))

    step = max(1, len(val['samples']) // max(FLAGS.pictures, 1))
    for rec in val['samples'][::step][:FLAGS.pictures]:
        path = visualize.render_sample(rec, cfg.dataroot, os.path.join(FLAGS.out, 'pictures', f'{rec["token"]}.png'))
        print(f'picture: {path}')


if __name__ == '__main__':
    app.run(main)
