"""experiments/bench_backbone.py on the toy backbone with repeated blocks: both forms, the same gradients."""
import pytest

from configs import bevformer_tiny
from tests.experiments import load_script


@pytest.mark.slow   # four compiles; the forms themselves are tested in tests/models/test_backbone.py
def test_loop_and_unrolled_compile_as_named_and_agree():
    config = bevformer_tiny.get_config('toy')
    config.model.backbone.stage_blocks = (1, 3, 1, 1)   # stage 2 has two repeated blocks
    entry = load_script('bench_backbone').compare(config, ('loop', 'unrolled'), iters=1, warmup=0)
    assert entry['loop/gradient']['loop_in_program'] and entry['loop/forward']['loop_in_program']
    assert not entry['unrolled/gradient']['loop_in_program'] and not entry['unrolled/forward']['loop_in_program']
    assert entry['gradient_max_difference'] < 1e-5
    assert entry['images'] == [6, 96, 160, 3]
    assert set(entry['loop_over_unrolled']) == {'forward', 'gradient'}
    assert all(entry['times'][name]['n'] == 1 for name in ('loop/gradient', 'unrolled/gradient'))
