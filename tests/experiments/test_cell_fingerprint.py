"""experiments/cell_fingerprint.py: the same code gives the same fingerprint; a change of a loss or of the
schedule (even late in a run) gives another."""
from configs import bevformer_tiny
from tests.experiments import load_script

cf = load_script('cell_fingerprint')


def _config(data_cfg, **sets):
    config = bevformer_tiny.get_config('toy')
    config.data.dataroot, config.data.records_dir = data_cfg.dataroot, data_cfg.records_dir
    config.train.num_steps = 40
    for key, value in sets.items():
        section, name = key.split('__')
        config[section][name] = value
    return config


def test_the_fingerprint_is_reproducible_and_sees_the_losses(data_cfg):
    base = cf.fingerprint(_config(data_cfg))
    assert len(base['steps']) == cf.STEPS and len(base['lr']) == 3 and base['detections']
    assert cf.behaviour_hash(cf.fingerprint(_config(data_cfg))) == cf.behaviour_hash(base)   # bit for bit
    weighted = cf.fingerprint(_config(data_cfg, loss__bbox_weight=0.5))    # a loss weight: other logged losses
    assert weighted['steps'][0]['loss'] != base['steps'][0]['loss']
    assert cf.behaviour_hash(weighted) != cf.behaviour_hash(base)


def test_the_fingerprint_sees_the_end_of_the_schedule(data_cfg):
    """A change that acts after the first steps (the cosine's floor: the first epoch runs at the full rate) is not
    in the logged steps, but in the schedule points."""
    base, later = _config(data_cfg), _config(data_cfg, optim__min_lr_ratio=0.5)
    points, changed = cf.schedule_points(base, 10, 40), cf.schedule_points(later, 10, 40)
    assert changed[0] == points[0] and changed[1:] != points[1:]
