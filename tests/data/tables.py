"""Editable copies of the synthetic set (tables copied, images and maps linked) for bad-input tests."""
import json
import os
import shutil

VERSION = 'v1.0-mini'


def copy_set(synthetic_root, dest, copy=(), link=('maps', 'samples')):
    """``dest`` with a copy of the tables and of the folders ``copy``, and links to ``link``."""
    os.makedirs(dest, exist_ok=True)
    for name in (VERSION, *copy):
        shutil.copytree(os.path.join(synthetic_root, name), os.path.join(dest, name))
    for name in link:
        os.symlink(os.path.join(synthetic_root, name), os.path.join(dest, name))
    return str(dest)


def copy_images(synthetic_root, dest):
    """A copy of the camera images only (``dest/samples/CAM_*``), to delete or corrupt."""
    shutil.copytree(os.path.join(synthetic_root, 'samples'), os.path.join(dest, 'samples'),
                    ignore=shutil.ignore_patterns('LIDAR_TOP'))
    return str(dest)


def edit_table(root, table, edit):
    """Rewrites ``<root>/<version>/<table>.json`` with ``edit(rows)`` (or the rows edited in place)."""
    path = os.path.join(root, VERSION, f'{table}.json')
    with open(path) as f:
        rows = json.load(f)
    edited = edit(rows)
    rows = rows if edited is None else edited
    with open(path, 'w') as f:
        json.dump(rows, f)  # NaN / Infinity as Python writes them


def set_splits(root, splits):
    with open(os.path.join(root, VERSION, 'splits.json'), 'w') as f:
        json.dump(splits, f)


def drop_annotations(root, scene_name):
    """Removes every annotation (and instance) of the samples of ``scene_name``."""
    with open(os.path.join(root, VERSION, 'scene.json')) as f:
        scene = next(s for s in json.load(f) if s['name'] == scene_name)
    with open(os.path.join(root, VERSION, 'sample.json')) as f:
        samples = {s['token'] for s in json.load(f) if s['scene_token'] == scene['token']}
    kept = set()

    def anns(rows):
        rows = [r for r in rows if r['sample_token'] not in samples]
        kept.update(r['instance_token'] for r in rows)
        return rows
    edit_table(root, 'sample_annotation', anns)
    edit_table(root, 'instance', lambda rows: [r for r in rows if r['token'] in kept])
