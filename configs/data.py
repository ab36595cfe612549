"""The input pipeline alone (used by the data demo). ``configs/data.py:toy`` = the synthetic set.

    python experiments/data_demo.py --config configs/data.py:toy --config.data.dataroot=DIR
"""
import ml_collections

from configs.common import check_arg, data_config


def get_config(arg='toy'):
    check_arg('data', arg, ('full', 'toy'))
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = data_config(toy=arg == 'toy')
    return config
