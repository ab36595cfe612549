"""A synthetic dataset in the nuScenes format, written by our own simulator.

``generate(out, num_scenes, seed, image_wh)`` writes ``out/<version>/*.json`` (the 13 nuScenes v1.0
tables), ``samples/CAM_*/*.jpg``, ``samples/LIDAR_TOP/*.pcd.bin``, ``maps/*.png`` (drivable area),
``can_bus/scene-*_pose.json`` (CAN-bus expansion) and ``fd3d_synthetic.json`` (what was generated).
Scenes take the names of the devkit's own splits (``nuscenes.utils.splits``): up to 10 scenes give
``v1.0-mini`` with ``mini_train``/``mini_val``, more give ``v1.0-trainval`` with ``train``/``val``,
so ``NuScenes`` and ``DetectionEval`` work unmodified. Deterministic per seed.
"""
import json
import multiprocessing
import os
import shutil
import time

from nuscenes.utils.splits import create_splits_scenes

from fd3d_jax.data.nuscenes_meta import (ATTRIBUTE_NAMES, CAMERA_NAMES, CATEGORY_OF_CLASS, LIDAR_NAME,
                                         VISIBILITY_LEVELS)
from fd3d_jax.data.synthetic.scene import make_token, simulate_scene

MARKER = 'fd3d_synthetic.json'
FORMAT = 1
TABLES = ('category', 'attribute', 'visibility', 'instance', 'sensor', 'calibrated_sensor',
          'ego_pose', 'log', 'scene', 'sample', 'sample_data', 'sample_annotation', 'map')
_OWNED = ('samples', 'maps', 'can_bus', 'v1.0-mini', 'v1.0-trainval', MARKER)


def plan_splits(num_scenes):
    """Version and ``{split: [scene names]}`` for ``num_scenes`` scenes (train scenes first)."""
    if num_scenes < 2:
        raise ValueError(f'--scenes must be >= 2 (one train and one val scene), got {num_scenes}')
    official = create_splits_scenes()
    if num_scenes <= 10:
        version, train, val = 'v1.0-mini', 'mini_train', 'mini_val'
        num_val = 2 if num_scenes == 10 else 1
    else:
        version, train, val = 'v1.0-trainval', 'train', 'val'
        num_val = min(len(official[val]), max(1, round(0.2 * num_scenes)))
    num_train = num_scenes - num_val
    if num_train > len(official[train]):
        raise ValueError(f'--scenes {num_scenes}: at most {len(official[train]) + num_val} scenes fit '
                         f'the devkit split names')
    return version, {train: sorted(official[train])[:num_train], val: sorted(official[val])[:num_val]}


def _static_tables(seed):
    tokens = dict(
        sensor={c: make_token(seed, 'sensor', c) for c in CAMERA_NAMES + (LIDAR_NAME,)},
        category={c: make_token(seed, 'category', c) for c in CATEGORY_OF_CLASS.values()},
        attribute={a: make_token(seed, 'attribute', a) for a in ATTRIBUTE_NAMES})
    tables = dict(
        sensor=[dict(token=t, channel=c, modality='lidar' if c == LIDAR_NAME else 'camera')
                for c, t in tokens['sensor'].items()],
        category=[dict(token=t, name=c, description=f'synthetic {c}') for c, t in tokens['category'].items()],
        attribute=[dict(token=t, name=a, description=a) for a, t in tokens['attribute'].items()],
        visibility=[dict(token=t, level=level, description=f'visibility of whole object is {level}')
                    for t, level, _ in VISIBILITY_LEVELS])
    return tables, tokens


def _check_out_dir(out, params, overwrite):
    """Returns True when ``out`` already holds exactly this dataset. Never deletes foreign files."""
    marker = os.path.join(out, MARKER)
    if os.path.exists(marker):
        with open(marker) as marker_file:
            if {k: v for k, v in json.load(marker_file).items() if k in params} == params:
                return True
        if not overwrite:
            raise FileExistsError(f'{out} holds a synthetic set with other parameters ({marker}); '
                                  f'pass --overwrite to replace it')
    elif os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f'{out} is not empty and holds no {MARKER}; refusing to write into it '
                              f'(pass --overwrite to replace the synthetic set files there)')
    for name in _OWNED:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    return False


def _simulate(args):
    return simulate_scene(*args)


def generate(out, num_scenes=10, seed=0, image_wh=(320, 180), workers=None, overwrite=False, verbose=True):
    """Writes the dataset and returns its description (version, splits, ...)."""
    image_wh = tuple(int(v) for v in image_wh)
    if min(image_wh) < 16:
        raise ValueError(f'--image-size must be at least 16x16, got {image_wh}')
    version, splits = plan_splits(num_scenes)
    params = dict(format=FORMAT, scenes=num_scenes, seed=seed, image_size=list(image_wh))
    info = dict(params, version=version, splits=splits)
    if _check_out_dir(out, params, overwrite):
        if verbose:
            print(f'{out}: synthetic set already present (seed {seed}, {num_scenes} scenes)')
        return info
    start = time.time()
    tables, tokens = _static_tables(seed)
    names = [n for split in splits.values() for n in split]
    jobs = [(out, seed, i, name, image_wh, tokens) for i, name in enumerate(names)]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        with multiprocessing.get_context('fork').Pool(workers) as pool:
            parts = pool.map(_simulate, jobs, chunksize=1)
    else:
        parts = [_simulate(job) for job in jobs]
    for part in parts:
        for table, rows in part.items():
            tables.setdefault(table, []).extend(rows)
    os.makedirs(os.path.join(out, version), exist_ok=True)
    for table in TABLES:
        with open(os.path.join(out, version, f'{table}.json'), 'w') as table_file:
            json.dump(tables.get(table, []), table_file, indent=0)
    info.update(samples=len(tables['sample']), annotations=len(tables['sample_annotation']),
                seconds=round(time.time() - start, 1))
    with open(os.path.join(out, MARKER), 'w') as marker_file:  # written last: marks a complete set
        json.dump(info, marker_file, indent=1)
    if verbose:
        print(f'wrote {out}: {num_scenes} scenes, {info["samples"]} samples, '
              f'{info["annotations"]} annotations in {info["seconds"]} s')
    return info
