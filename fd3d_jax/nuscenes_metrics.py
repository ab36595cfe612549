"""Detections in the LiDAR frame -> nuScenes results JSON (global frame) -> the devkit's
``DetectionEval`` (config ``detection_cvpr_2019``), as mmdet3d's ``NuScenesDataset`` does.

Metrics always come from nuscenes-devkit; nothing here re-implements them. The devkit is imported inside the
functions that use it (installed apart, seconds to import: building results JSON does not need it).
"""
import contextlib
import json
import os

import numpy as np

from fd3d_jax.data import geometry
from fd3d_jax.data.nuscenes_meta import MOVING_ATTRIBUTE, MOVING_SPEED, STATIC_ATTRIBUTE, SUBMISSION_META

EVAL_CONFIG = 'detection_cvpr_2019'


def _class_ranges():
    from nuscenes.eval.common.config import config_factory
    return config_factory(EVAL_CONFIG).class_range


def default_attribute(name, velocity):
    """mmdet3d's attribute of a predicted box from its speed."""
    moving = np.hypot(velocity[0], velocity[1]) > MOVING_SPEED
    return (MOVING_ATTRIBUTE if moving else STATIC_ATTRIBUTE)[name]


def boxes_to_results(record, boxes, scores, labels, class_names, attributes=None, class_ranges=None):
    """Converts one sample's detections to nuScenes result dicts.

    Args:
      record: the sample's record (``fd3d_jax.data.records``).
      boxes: (n, 9) LiDAR-frame boxes ``(x, y, z_gravity, w, l, h, yaw, vx, vy)``.
      scores: (n,); labels: (n,) indices into ``class_names``.
      attributes: optional (n,) attribute names; default from the speed (mmdet3d's rule).
      class_ranges: per-class ego-distance limits; boxes beyond are dropped as mmdet3d's
        ``lidar_nusc_box_to_global`` does (default: the evaluation config's ``class_range``).
    Returns:
      list of result dicts with translation/size/rotation/velocity in the global frame.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 9)
    class_ranges = class_ranges or _class_ranges()
    lidar2ego = np.asarray(record['lidar2ego'])
    ego2global = np.asarray(record['ego2global'])
    ego_boxes, ego_vel = geometry.transform_boxes(lidar2ego, boxes[:, :7], boxes[:, 7:9])
    glob_boxes, glob_vel = geometry.transform_boxes(ego2global, ego_boxes, ego_vel)
    out = []
    for box_index in range(len(boxes)):
        name = class_names[int(labels[box_index])]
        if np.linalg.norm(ego_boxes[box_index, :2]) > class_ranges[name]:
            continue
        attr = attributes[box_index] if attributes is not None else default_attribute(name, boxes[box_index, 7:9])
        out.append(dict(
            sample_token=record['token'],
            translation=glob_boxes[box_index, :3].tolist(),
            size=boxes[box_index, 3:6].tolist(),
            rotation=geometry.yaw_to_quat(glob_boxes[box_index, 6]).tolist(),
            velocity=glob_vel[box_index].tolist(),
            detection_name=name,
            detection_score=float(scores[box_index]),
            attribute_name=attr))
    return out


def results_json(records, detections, meta=None):
    """nuScenes results for every sample of ``records``; ``detections`` maps sample token -> list
    of result dicts (missing samples get an empty list, as the devkit requires every sample). ``meta``: the five
    ``use_*`` flags of the submission format (a config's ``submission``); ``SUBMISSION_META`` when None."""
    meta = dict(SUBMISSION_META if meta is None else meta)
    if set(meta) != set(SUBMISSION_META) or not all(isinstance(value, bool) for value in meta.values()):
        raise ValueError(f'submission meta must hold the booleans {", ".join(SUBMISSION_META)}; got {meta}')
    return dict(meta=meta, results={r['token']: detections.get(r['token'], []) for r in records['samples']})


def has_annotations(records):
    """Whether any sample of ``records`` has a GT box: False for nuScenes ``test`` (its ``sample_annotation``
    table is empty), which is scored only by the evaluation server."""
    return any(len(rec['gt_names']) for rec in records['samples'])


def gt_as_detections(records, class_names):
    """The records' valid ground truth (with lidar or radar points: what the devkit keeps) as
    detections with score 1 and their own attributes, through the same conversion as model outputs:
    a check of the conversion and of the evaluation set-up."""
    detections = {}
    for rec in records['samples']:
        keep = [i for i, n in enumerate(rec['gt_names']) if n in class_names and rec['valid_flag'][i]]
        boxes = np.concatenate([np.asarray(rec['gt_boxes']).reshape(-1, 7),
                                np.asarray(rec['gt_velocity']).reshape(-1, 2)], 1)[keep]
        labels = [class_names.index(rec['gt_names'][i]) for i in keep]
        attrs = [rec['gt_attributes'][i] for i in keep]
        detections[rec['token']] = boxes_to_results(rec, boxes, np.ones(len(keep)), labels, class_names, attrs)
    return detections


def write_results(results, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as out_file:
        json.dump(results, out_file)


def run_detection_eval(results_path, dataroot, version, split, out_dir, nusc=None, verbose=False):
    """Runs the devkit's DetectionEval; writes ``out_dir/metrics_summary.json`` and returns it."""
    from nuscenes import NuScenes
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval
    from fd3d_jax.data.records import split_scene_names
    nusc = nusc or NuScenes(version=version, dataroot=dataroot, verbose=verbose)
    split_scene_names(nusc, split)  # a clear error for unknown splits before the devkit asserts
    # DetectionEval.main prints its summary (and tqdm bars) whatever `verbose` says.
    with open(os.devnull, 'w') as null, contextlib.ExitStack() as stack:
        if not verbose:
            stack.enter_context(contextlib.redirect_stdout(null))
            stack.enter_context(contextlib.redirect_stderr(null))
        evaluator = DetectionEval(nusc, config=config_factory(EVAL_CONFIG), result_path=results_path,
                                  eval_set=split, output_dir=out_dir, verbose=verbose)
        evaluator.main(plot_examples=0, render_curves=False)
    with open(os.path.join(out_dir, 'metrics_summary.json')) as summary_file:
        return json.load(summary_file)


def format_metrics(summary):
    """A text table of NDS, mAP, TP errors and per-class AP from ``metrics_summary.json``."""
    tp = summary['tp_errors']
    lines = ['| NDS | mAP | mATE | mASE | mAOE | mAVE | mAAE |', '|---|---|---|---|---|---|---|',
             '| {:.4f} | {:.4f} | {:.4f} | {:.4f} | {:.4f} | {:.4f} | {:.4f} |'.format(
                 summary['nd_score'], summary['mean_ap'], tp['trans_err'], tp['scale_err'],
                 tp['orient_err'], tp['vel_err'], tp['attr_err']),
             '', '| class | AP | ATE | ASE | AOE | AVE | AAE |', '|---|---|---|---|---|---|---|']
    for name, ap in summary['mean_dist_aps'].items():
        class_errors = summary['label_tp_errors'][name]
        lines.append('| {} | {:.3f} | {:.3f} | {:.3f} | {:.3f} | {:.3f} | {:.3f} |'.format(
            name, ap, class_errors['trans_err'], class_errors['scale_err'], class_errors['orient_err'],
            class_errors['vel_err'], class_errors['attr_err']))
    return '\n'.join(lines)
