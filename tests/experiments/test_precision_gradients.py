"""experiments/precision_gradients.py on the toy BEVFormer over the tests' synthetic set."""
import json
import os

import pytest

from tests.experiments import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_bfloat16_gradient_beside_the_dropout_spread(synthetic_root, tmp_path):
    path = load_script('precision_gradients').main([
        '--config', os.path.join(ROOT, 'configs', 'bevformer_tiny.py:toy'), '--dataroot', 'None', '--version',
        'None', f'--config.data.dataroot={synthetic_root}', '--config.data.raw_image_wh=(160, 90)',
        '--out-dir', str(tmp_path), '--batches', '2'])
    with open(path) as f:
        result = json.load(f)
    assert len(result['per_batch']) == 2 and {'kernel', 'bias', 'scale'} <= set(result['per_kind'])
    for batch in result['per_batch']:
        # The same dropout key: bfloat16's loss is float32's up to rounding; another key moves it more.
        assert batch['loss_bfloat16'] == pytest.approx(batch['loss_float32'], rel=0.02)
        assert 0 < batch['bfloat16_rel_error'] < batch['other_dropout_rel_error']
    # The attention key bias gets no gradient in exact arithmetic: reported apart, not as a huge relative error.
    assert any("['key']['bias']" in key for key in result['zero_in_float32'])
    assert all(stats['median'] < 1 for stats in result['per_kind'].values())
