"""A broken devkit table or camera image ends with one line naming the file: ``<table path>: ...`` when the records
are built, ``cannot decode image <path> (sample <token>)`` when a batch is read (also from grain worker
processes), through ``python -m fd3d_jax.train`` too."""
import json
import os
import re
import shutil

import numpy as np
import pytest

from fd3d_jax.data import pipeline
from fd3d_jax.data import records as records_lib
from fd3d_jax.errors import DataConfigError, DataError, RecordsError
from tests.data.tables import VERSION, copy_images, copy_set, edit_table, set_splits
from tests.data.test_pipeline import data_config_copy
from tests.test_cli import _assert_ended_cleanly, _run


def _drop_field(field, index=0):
    def edit(rows):
        del rows[index][field]
    return edit


def _truncate(path):
    text = open(path).read()
    with open(path, 'w') as f:
        f.write(text[:len(text) // 2])


def _first_token(root, table):
    with open(os.path.join(root, VERSION, f'{table}.json')) as f:
        return json.load(f)[0]['token']


# (table, how it is broken, the message after '<table path>: ')
TABLE_FAULTS = {
    'missing file': ('calibrated_sensor', os.remove, r'no such file \(a table of nuScenes v1\.0-mini'),
    'truncated JSON': ('sample_data', _truncate, r'not valid JSON, the file is truncated or corrupt \(.*char \d+\)'),
    'not a list': ('sample', lambda path: open(path, 'w').write('{}'), r'a JSON dict, not a list of records'),
    'field the devkit reads': ('sample_data', 'calibrated_sensor_token',
                               r"record 0 \(token '{token}'\) has no field 'calibrated_sensor_token'"),
    'field only the records read': ('calibrated_sensor', 'camera_intrinsic',
                                    r"record 0 \(token '{token}'\) has no field 'camera_intrinsic'"),
}


@pytest.mark.parametrize('fault', TABLE_FAULTS)
def test_a_broken_table_is_named_when_the_records_are_built(fault, synthetic_root, tmp_path):
    root = copy_set(synthetic_root, tmp_path / 'set')
    table, breaking, message = TABLE_FAULTS[fault]
    path = os.path.join(root, VERSION, f'{table}.json')
    token = _first_token(root, table)
    if isinstance(breaking, str):
        edit_table(root, table, _drop_field(breaking))
    else:
        breaking(path)
    with pytest.raises(RecordsError) as caught:
        records_lib.get_records(root, VERSION, 'mini_train', str(tmp_path / 'records'), synthetic_root)
    assert re.fullmatch(re.escape(path) + ': ' + message.format(token=token) + '.*', str(caught.value)), caught.value
    assert '\n' not in str(caught.value)


def test_a_table_removed_after_the_records_were_cached_is_named(synthetic_root, tmp_path):
    """The cached records' freshness check reads the tables' sizes: a missing one is named there too."""
    root = copy_set(synthetic_root, tmp_path / 'set')
    records_lib.get_records(root, VERSION, 'mini_train', str(tmp_path / 'records'), synthetic_root)
    path = os.path.join(root, VERSION, 'calibrated_sensor.json')
    os.remove(path)
    with pytest.raises(RecordsError, match=f'^{re.escape(path)}: no such file'):
        records_lib.get_records(root, VERSION, 'mini_train', str(tmp_path / 'records'), synthetic_root)


def test_a_dangling_token_or_a_truncated_splits_file_is_named(synthetic_root, tmp_path):
    """A failure no single table explains names the version folder and the devkit's error; a custom split's
    ``splits.json`` that is not JSON names that file."""
    root = copy_set(synthetic_root, tmp_path / 'set')

    def dangle(rows):
        rows[0]['calibrated_sensor_token'] = 'no-such-row'
    edit_table(root, 'sample_data', dangle)
    with pytest.raises(RecordsError, match=f"^{re.escape(os.path.join(root, VERSION))}: the nuScenes devkit cannot "
                                           r"load these tables \(KeyError: 'no-such-row'\)$"):
        records_lib.get_records(root, VERSION, 'mini_train', str(tmp_path / 'records'), synthetic_root)
    root = copy_set(synthetic_root, tmp_path / 'set2')
    set_splits(root, {'mine': ['scene-0061']})
    _truncate(os.path.join(root, VERSION, 'splits.json'))
    with pytest.raises(RecordsError, match=f"^{re.escape(os.path.join(root, VERSION, 'splits.json'))}: cannot be "
                                           'read as JSON'):
        records_lib.get_records(root, VERSION, 'mine', str(tmp_path / 'records'), synthetic_root)


def test_empty_truncated_or_unreadable_images_name_the_file_and_sample(train_records, data_cfg, tmp_path):
    """Each fault of a camera image is a DataError naming the file and the sample (skipped like a missing image
    with ``data.skip_bad_samples``); a JPEG cut short is reported with what PIL found."""
    root = copy_images(data_cfg.dataroot, tmp_path / 'broken')
    rec = train_records['samples'][4]
    path = os.path.join(root, rec['cams'][0]['path'])
    good = open(path, 'rb').read()
    cases = [(b'', r'the file is empty \(0 bytes\)'),
             (good[:len(good) // 2], r'OSError: image file is truncated'),
             (b'not a JPEG', r'not an image format PIL knows')]
    for content, why in cases:
        with open(path, 'wb') as f:
            f.write(content)
        with pytest.raises(DataError, match=f"^cannot decode image {re.escape(path)} \\(sample {rec['token']}\\): "
                                            f'{why}'):
            pipeline.load_image(path, rec['token'])
    cfg = data_config_copy(data_cfg, dataroot=root, queue_length=1, filter_empty_gt=False, photometric=False,
                           skip_bad_samples=True)
    loader = pipeline.SampleLoader(train_records, root, cfg)
    out = loader.train(4, np.random.default_rng(0))
    assert out['sample_idx'] != 4 and loader.skipped == 1
    os.remove(path)
    os.mkdir(path)
    with pytest.raises(DataError, match=f"^cannot read image {re.escape(path)} \\(sample {rec['token']}\\): "):
        pipeline.load_image(path, rec['token'])


def _truncate(path):
    with open(path, 'rb') as f:
        content = f.read()
    with open(path, 'wb') as f:
        f.write(content[:len(content) // 2])


@pytest.mark.parametrize('table, damage, message', [
    ('calibrated_sensor.json', os.remove, 'no such file (a table of nuScenes v1.0-mini'),
    ('sample_data.json', _truncate, 'not valid JSON, the file is truncated or corrupt ('),
])
def test_training_on_a_set_without_a_table_ends_with_its_path(table, damage, message, data_cfg, tmp_path):
    root = copy_set(data_cfg.dataroot, tmp_path / 'set')
    path = os.path.join(root, VERSION, table)
    damage(path)
    res = _run('fd3d_jax.train', f'--workdir={tmp_path / "run"}', f'--config.data.dataroot={root}',
               f'--config.data.records_dir={tmp_path / "records"}', f'--config.data.can_bus_root={data_cfg.dataroot}')
    line = _assert_ended_cleanly(res)
    assert line.startswith(f'error: {path}: {message}'), line


@pytest.mark.slow
@pytest.mark.scaleout   # a reliability test of the CLI: `make test` runs it after the default suite
def test_training_on_an_empty_image_ends_with_its_file_and_sample_from_a_worker(data_cfg, train_records, tmp_path):
    """Every CAM_FRONT image empty, read by a grain worker process (``data.num_workers=1``): the worker's
    DataError reaches the training process, which ends with one line and exit status 1, saving nothing."""
    root = tmp_path / 'data'
    copy_images(data_cfg.dataroot, root)
    for name in os.listdir(data_cfg.dataroot):
        if name != 'samples':
            os.symlink(os.path.join(data_cfg.dataroot, name), root / name)
    os.symlink(os.path.join(data_cfg.dataroot, 'samples', 'LIDAR_TOP'), root / 'samples' / 'LIDAR_TOP')
    tokens = {}
    for rec in train_records['samples']:
        cam = next(c for c in rec['cams'] if c['channel'] == 'CAM_FRONT')
        open(os.path.join(root, cam['path']), 'wb').close()
        tokens[os.path.join(root, cam['path'])] = rec['token']
    workdir = tmp_path / 'run'
    res = _run('fd3d_jax.train', f'--workdir={workdir}', f'--config.data.dataroot={root}',
               f'--config.data.records_dir={data_cfg.records_dir}', '--config.data.num_workers=1')
    line = _assert_ended_cleanly(res)
    found = re.fullmatch(r'error: cannot decode image (\S+) \(sample (\w+)\): the file is empty \(0 bytes\)', line)
    assert found and tokens.get(found.group(1)) == found.group(2), line
    assert not os.path.exists(workdir / 'checkpoints') or not os.listdir(workdir / 'checkpoints')
    shutil.rmtree(root)


def test_a_sample_over_max_gt_fails_when_the_dataset_is_made(train_records, data_cfg):
    """``data.max_gt`` below a sample's GT count after the pipeline's filtering (class, valid flag, BEV range) is
    a DataConfigError when the training or evaluation dataset is made, before any batch, also with
    ``data.skip_bad_samples``; the count is the filtered one (the set's samples have more GT before it)."""
    kept = [int(pipeline.ground_truth(rec, data_config_copy(data_cfg, max_gt=500))[2].sum())
            for rec in train_records['samples']]
    assert max(len(rec['gt_boxes']) for rec in train_records['samples']) > max(kept)
    pipeline.train_dataset(train_records, data_cfg.dataroot, data_config_copy(data_cfg, max_gt=max(kept)), 2, 0)
    limit = max(kept) - 5
    first = next(index for index, count in enumerate(kept) if count > limit)
    over = sum(count > limit for count in kept)
    message = (f"^sample {train_records['samples'][first]['token']} has {kept[first]} GT boxes after filtering, more "
               f'than config data.max_gt={limit}; raise data.max_gt \\({over} of the {len(kept)} samples of split '
               f"'mini_train' exceed it; the most GT of one sample: {max(kept)}\\)$")
    for skip in (False, True):
        cfg = data_config_copy(data_cfg, max_gt=limit, skip_bad_samples=skip)
        with pytest.raises(DataConfigError, match=message):
            pipeline.train_dataset(train_records, data_cfg.dataroot, cfg, 2, 0)
    with pytest.raises(DataConfigError, match=message):
        pipeline.eval_dataset(train_records, data_cfg.dataroot, data_config_copy(data_cfg, max_gt=limit), 2)
