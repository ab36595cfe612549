"""Official PyTorch checkpoints of BEVFormer (tiny/small/base) and DETR3D <-> our Flax params.

``python -m fd3d_jax.convert`` converts files; ``torch_to_flax`` / ``flax_to_torch`` work on plain
dicts of numpy arrays (``convert.py``); ``official_keys.py`` lists the original state-dict keys and
shapes of a config, ``mapping.py`` maps them to our param paths with their layout transforms (and
documents where our model deviates from the original).
"""
from fd3d_jax.convert.convert import ConvertError, flax_to_torch, ignored_keys, torch_to_flax

__all__ = ['ConvertError', 'flax_to_torch', 'ignored_keys', 'torch_to_flax']
