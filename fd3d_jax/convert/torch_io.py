"""Reading and writing ``.pth`` files (PyTorch is imported here only, when a file is read or written).

``load_state_dict(path)``: ``torch.load(path, map_location='cpu', weights_only=True)`` (no arbitrary
pickled objects are executed), the ``state_dict`` of an mmcv checkpoint (``{'meta', 'state_dict',
'optimizer'}``) or a bare state dict, as ``{key: numpy array}`` (bfloat16 -> float32, other dtypes
kept). ``save_state_dict(sd, path, meta)``: ``torch.save({'meta': meta, 'state_dict': ...})``, the
layout of mmcv's ``save_checkpoint``, which mmcv's ``load_checkpoint`` and the original
``tools/test.py`` read (``meta['CLASSES']`` names the classes).
"""
import collections
from typing import Dict, Mapping

import numpy as np

from fd3d_jax.convert.convert import ConvertError

INSTALL_HINT = ('reading or writing .pth files needs PyTorch (CPU is enough): '
                'pip install torch --index-url https://download.pytorch.org/whl/cpu')


def _torch():
    try:
        import torch
    except ImportError:
        raise ConvertError(INSTALL_HINT) from None
    return torch


def load_state_dict(path) -> Dict[str, np.ndarray]:
    torch = _torch()
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise ConvertError(f'no such checkpoint: {path}') from None
    except Exception as error:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ...
        raise ConvertError(
            f'{path}: torch.load(weights_only=True) failed ({type(error).__name__}: {error}). If the file holds '
            f'other Python objects than tensors and plain containers, extract the state dict where you '
            f"trust the file: torch.save(torch.load(p, weights_only=False)['state_dict'], 'sd.pth')") from None
    if isinstance(obj, Mapping) and isinstance(obj.get('state_dict'), Mapping):
        obj = obj['state_dict']
    if not isinstance(obj, Mapping):
        raise ConvertError(f'{path} holds a {type(obj).__name__}, not a state dict')
    out, bad = {}, []
    for key, value in obj.items():
        if not torch.is_tensor(value):
            bad.append(f'{key} ({type(value).__name__})')
            continue
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        out[key] = value.numpy()
    if bad:
        raise ConvertError(f'{path}: state dict entries that are not tensors: ' + ', '.join(bad))
    return out


def save_state_dict(state_dict: Dict[str, np.ndarray], path, meta=None):
    torch = _torch()
    # np.ascontiguousarray would turn 0-d arrays (BN counters) into shape (1,)
    sd = collections.OrderedDict((k, torch.from_numpy(np.array(v, order='C'))) for k, v in state_dict.items())
    torch.save({'meta': dict(meta or {}), 'state_dict': sd}, path)
