"""File to file: an official ``.pth`` -> a params folder, and a params folder -> a ``.pth``.

``to_flax(torch_checkpoint, config, out)`` writes ``out/params`` with
``fd3d_jax.params_io.save_params`` (so ``config.distill.expert_checkpoint=out`` loads it) and
``out/conversion.json`` (source, model, counts, every ignored key with its reason). No
``config.json`` is written: a converted checkpoint is valid for every setting of the flags that do
not change params (e.g. ``model.reproduce_shift_bug``), which ``load_expert_params`` would otherwise
compare against ``config.expert.model``.
``to_torch(params_dir, config, out)`` reads a params folder (or a training workdir:
``params['model']`` of its latest checkpoint) and writes an mmcv-style ``.pth``.
The params folders (``out`` of ``to_flax``, ``params_dir`` of ``to_torch``) may be URLs (``gs://bucket/expert``,
``fd3d_jax.storage``); the ``.pth`` files are local.
"""
import json

from fd3d_jax import storage
from fd3d_jax.convert import convert, torch_io
from fd3d_jax.params_io import load_params, save_params

REPORT = 'conversion.json'


def to_flax(torch_checkpoint, config, out, convert_yaw=True, config_name=''):
    """Returns the summary dict also written to ``out/conversion.json``."""
    sd = convert.normalize_state_dict(torch_io.load_state_dict(torch_checkpoint))
    abstract = convert.abstract_params(config)
    params = convert.torch_to_flax(sd, config, convert_yaw, abstract=abstract)
    save_params(params, out)
    info = dict(source=str(storage.as_path(torch_checkpoint)), config=config_name, model=config.model.name,
                convert_yaw=bool(convert_yaw), **convert.summary(sd, params, config))
    (storage.as_path(out) / REPORT).write_text(json.dumps(info, indent=1))
    return info


def to_torch(params_dir, config, out, template=None, convert_yaw=True, config_name=''):
    """Returns the number of keys written. ``template``: a ``.pth`` whose values fill what our
    params do not hold (``convert.flax_to_torch``'s ``fill``)."""
    params = load_params(params_dir)
    fill = torch_io.load_state_dict(template) if template else None
    sd = convert.flax_to_torch(params, config, fill=fill, convert_yaw=convert_yaw)
    meta = dict(fd3d_jax=dict(params=str(storage.as_path(params_dir)), config=config_name,
                              convert_yaw=bool(convert_yaw)))
    if 'data' in config and 'class_names' in config.data:
        meta['CLASSES'] = tuple(config.data.class_names)
    torch_io.save_state_dict(sd, out, meta)
    return len(sd)
