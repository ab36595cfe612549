"""Picture of FD3D's query masks and focal points on a synthetic sample (README, docs/distillation.md).

    python experiments/distill_picture.py --config configs/fd3d_bevformer_base_to_tiny.py:demo \
        --config.distill.expert_checkpoint=E [--apprentice W] [--index 10] --out experiments/results/fd3d_masks.png

Runs the expert (its head is the frozen distillation head) and the apprentice (``--apprentice``: a
training workdir; default: freshly initialised) on one validation sample, selects queries with
``config.distill.mask``, and draws the expert and apprentice BEVs, the BEV query mask, the last decoder
layer's focal sampling points of the selected queries, and the PV mask on the front camera.
"""
import os

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from fd3d_jax import visualize
from fd3d_jax.data import pipeline, records
from fd3d_jax.data.pipeline import load_image
from fd3d_jax.distill import masks
from fd3d_jax.distill import build_distillation
from fd3d_jax.models.box_coder import denormalize_bbox
from fd3d_jax.models import build, detector_class
from fd3d_jax.models.inputs import dummy_batch
from fd3d_jax.params_io import load_params
from fd3d_jax.train.state import init_params

config_flags.DEFINE_config_file('config', 'configs/fd3d_bevformer_base_to_tiny.py:demo', 'distillation pair config')
flags.DEFINE_string('apprentice', '', 'training workdir of the apprentice (default: initialised weights)')
flags.DEFINE_integer('index', 10, 'validation sample index')
flags.DEFINE_string('out', 'experiments/results/fd3d_masks.png', 'output PNG')
FLAGS = flags.FLAGS


def main(argv):
    del argv
    config = FLAGS.config
    if not detector_class(config.model).has_bev:
        raise SystemExit('error: the picture shows BEV masks: give a pair config of detectors with a BEV (BEVFormer)')
    d = config.data
    distiller, expert_params = build_distillation(config)
    if distiller is None:
        raise SystemExit('error: config.distill.method is none')
    model = build(config.model)
    params = (load_params(FLAGS.apprentice) if FLAGS.apprentice
              else init_params(model, dummy_batch(config, 1, queue_length=1), config.seed))
    val = records.get_records(d.dataroot, d.version, d.val_split, d.records_dir, can_bus_root=d.can_bus_root,
                              can_bus_from_poses=d.can_bus_from_poses)
    loader = pipeline.SampleLoader(val, d.dataroot, d, pipeline.bev_config(config.model),
                                   pipeline.bev_config(config.expert.model))
    batch = jax.tree_util.tree_map(lambda x: np.asarray(x)[None], loader.eval(FLAGS.index))
    expert_out = distiller.expert.apply({'params': expert_params}, distiller.expert_batch(batch))
    out = model.apply({'params': params}, batch)
    c, e, a = config.distill.mask, config.expert.model, config.model
    keep, scores = masks.select_queries(expert_out['cls_scores'][-1], c.select, c.score_thresh, c.topk)
    keep = np.asarray(keep[0]) > 0
    boxes = np.asarray(denormalize_bbox(expert_out['bbox_preds'][-1]))
    bev_mask = masks.bev_box_mask(boxes, keep[None].astype(np.float32), (e.bev_h, e.bev_w), tuple(e.pc_range),
                                  c.box_scale)[0]
    smp = expert_out['sampling'][-1]
    loc = np.asarray(smp['sampling_locations'])[0][keep].reshape(-1, 2)      # (k * M * P, 2)
    wts = np.asarray(smp['attention_weights'])[0][keep].reshape(-1)
    eb = distiller.expert_batch(batch)
    level = distiller.pairs[0][1] if distiller.pairs else 0
    feat_hw = expert_out['img_feats'][level].shape[2:4]
    cam = 0                                                                   # CAM_FRONT
    pv = masks.pv_box_mask(boxes, keep[None].astype(np.float32), eb['lidar2img'][:, -1], distiller.exp_img_hw,
                           [feat_hw], c.box_scale)[0][0, cam]
    rec = val['samples'][FLAGS.index]
    image = load_image(os.path.join(d.dataroot, rec['cams'][cam]['path']), rec['token'])
    # the PV mask lives on the padded, scaled expert image: crop to the camera image's extent
    scale = d.image_scale * distiller.upsample
    h_pad, w_pad = distiller.exp_img_hw
    pv = np.asarray(pv)
    rows = int(round(pv.shape[0] * image.shape[0] * scale / h_pad))
    cols = int(round(pv.shape[1] * image.shape[1] * scale / w_pad))
    gt_boxes, gt_names = visualize.gt_of_record(rec)
    path = visualize.render_distillation(
        FLAGS.out, np.asarray(expert_out['bev'][0]).reshape(e.bev_h, e.bev_w, -1),
        np.asarray(out['bev'][0]).reshape(a.bev_h, a.bev_w, -1), np.asarray(bev_mask), boxes[0][keep], loc, wts,
        e.pc_range, gt_boxes, gt_names, image, pv[:rows, :cols],
        title=f"{rec['scene_name']} frame {rec['frame_idx']}: select={c.select}")
    print(f'{int(keep.sum())} queries selected (max score {float(np.max(scores)):.2f}); wrote {path}')


if __name__ == '__main__':
    app.run(main)
