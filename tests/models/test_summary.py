import json
import subprocess
import sys

import pytest

from configs import bevformer_base
from fd3d_jax.models.summary import summarize

PYTORCH_BASE_TRAIN_BYTES = 28.5e9  # BEVFormer README: base needs 28 500 MB to train


def test_summary_cli_prints_the_documented_json():
    proc = subprocess.run([sys.executable, '-m', 'fd3d_jax.models.summary', '--config=configs/detr3d_r50.py:toy',
                           '--json'], capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {'params', 'gflops', 'infer_peak_bytes', 'train_peak_bytes'} <= set(out)
    assert out['params'] > 0 and out['gflops'] > 0 and 0 < out['infer_peak_bytes'] < out['train_peak_bytes']


@pytest.mark.slow
def test_bevformer_base_trains_in_less_memory_than_the_pytorch_original():
    s = summarize(bevformer_base.get_config('full'))  # compile only
    assert 69e6 < s['params'] < 69.3e6
    assert s['train_peak_bytes'] < PYTORCH_BASE_TRAIN_BYTES, s
