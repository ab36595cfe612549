import numpy as np
from PIL import Image

from fd3d_jax import visualize


def test_render_sample_writes_a_png(val_records, tmp_path):
    rec = val_records['samples'][4]
    boxes, names = visualize.gt_of_record(rec)
    assert len(boxes) > 0
    pred = dict(boxes=boxes + 0.3, labels=[visualize.CLASS_NAMES.index(n) for n in names], scores=np.full(len(names), 0.9))
    path = visualize.render_sample(rec, val_records['dataroot'], str(tmp_path / 'a.png'), pred=pred)
    with Image.open(path) as im:
        assert im.size[0] >= 1000 and im.size[1] >= 600
        assert np.asarray(im.convert('L')).std() > 10  # not blank
