"""Converts official BEVFormer / DETR3D PyTorch checkpoints to our params, and back.

    python -m fd3d_jax.convert --torch-checkpoint X.pth --config configs/NAME.py[:ARG] --out DIR
    python -m fd3d_jax.convert --to-torch --params DIR --config configs/NAME.py[:ARG] --out X.pth [--template X.pth]

The first writes ``DIR/params`` (use it as ``--config.distill.expert_checkpoint=DIR``) and
``DIR/conversion.json``; the second reads a params folder or a training workdir. ``--config.key=value``
overrides work as in ``fd3d_jax.train``. ``--noconvert-yaw`` keeps the checkpoint's mmdet3d-0.x yaw
code (see ``fd3d_jax/convert/mapping.py``). Reading/writing ``.pth`` needs PyTorch (CPU build).
A checkpoint that does not fit the config ends with ``error: ...`` listing every unexpected key,
every param left without a source and every shape mismatch.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fd3d_jax.cli import exit_on, parse_flags
from fd3d_jax.convert import checkpoint_files

config_flags.DEFINE_config_file('config', None, 'the model\'s config, e.g. configs/bevformer_base.py')
flags.DEFINE_string('torch-checkpoint', None, 'official .pth to convert to a params folder')
flags.DEFINE_bool('to-torch', False, 'convert a params folder (--params) to a .pth instead')
flags.DEFINE_string('params', None, 'with --to-torch: params folder (or training workdir) to read')
flags.DEFINE_string('template', None, 'with --to-torch: .pth whose values fill keys our params lack '
                    '(BN counters, code_weights, unused level_embeds rows)')
flags.DEFINE_string('out', None, 'output: params folder, or .pth with --to-torch')
flags.DEFINE_bool('convert-yaw', True, 'map the reg branches\' mmdet3d-0.x yaw code to ours (and back)')
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        sys.exit(f'error: unexpected arguments {argv[1:]}')
    config, out = FLAGS.config, FLAGS['out'].value
    if config is None or not out:
        sys.exit('error: --config and --out are required')
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    name = FLAGS['config'].config_filename
    yaw = FLAGS['convert-yaw'].value
    if FLAGS['to-torch'].value:
        if not FLAGS['params'].value or FLAGS['torch-checkpoint'].value:
            sys.exit('error: --to-torch reads --params DIR (not --torch-checkpoint)')
        num_keys = exit_on(checkpoint_files.to_torch, FLAGS['params'].value, config, out,
                           FLAGS['template'].value, yaw, name)
        print(f'wrote {num_keys} keys to {out}')
        return
    if not FLAGS['torch-checkpoint'].value:
        sys.exit('error: give --torch-checkpoint X.pth (or --to-torch --params DIR)')
    if FLAGS['params'].value or FLAGS['template'].value:
        sys.exit('error: --params and --template go with --to-torch')
    info = exit_on(checkpoint_files.to_flax, FLAGS['torch-checkpoint'].value, config, out, yaw, name)
    print(f"converted {info['converted_keys']} of {info['checkpoint_keys']} keys into {info['param_leaves']} "
          f"params ({info['parameters']:,} values) in {out}; {len(info['ignored'])} ignored "
          f"(see {out}/conversion.json)")


if __name__ == '__main__':
    app.run(main, flags_parser=parse_flags)
