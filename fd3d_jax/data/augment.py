"""Training image augmentation: BEVFormer/DETR3D's ``PhotoMetricDistortionMultiViewImage``.

The original runs on each camera image of each frame (float32 BGR from ``mmcv.imread``, before
normalisation and resizing), in this order, each step with probability 0.5 (``randint(2)``):
brightness ``+ U(-32, 32)``; ``mode = randint(2)``, mode 1: contrast ``x U(0.5, 1.5)`` now; BGR -> HSV
(cv2 float32: H in degrees 0..360); saturation ``S x U(0.5, 1.5)``; hue ``H + U(-18, 18)``, then
``H > 360 -> H - 360``, ``H < 0 -> H + 360``; HSV -> BGR; mode 0: contrast now; channel permutation
``img[..., permutation(3)]``. No clipping anywhere.

Our images are RGB at this point, so the conversions use ``COLOR_RGB2HSV``/``COLOR_HSV2RGB`` and the
drawn (BGR) channel permutation ``p`` becomes ``2 - p[::-1]`` on RGB: for the same draws the result is
exactly the original's result on the corresponding BGR image, with the channels reversed.
"""
import cv2
import numpy as np


def photometric_params(rng, brightness_delta=32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
                       hue_delta=18):
    """The random draws of one image, in the original's order, from a numpy Generator: dict of
    brightness, contrast, saturation, hue (float or None = skipped), contrast_first (bool) and
    swap ((3,) permutation of BGR channel indices, or None)."""
    params = dict(brightness=None, contrast=None, saturation=None, hue=None, swap=None)
    if rng.integers(2):
        params['brightness'] = rng.uniform(-brightness_delta, brightness_delta)
    params['contrast_first'] = bool(rng.integers(2) == 1)
    if params['contrast_first'] and rng.integers(2):
        params['contrast'] = rng.uniform(*contrast_range)
    if rng.integers(2):
        params['saturation'] = rng.uniform(*saturation_range)
    if rng.integers(2):
        params['hue'] = rng.uniform(-hue_delta, hue_delta)
    if not params['contrast_first'] and rng.integers(2):
        params['contrast'] = rng.uniform(*contrast_range)
    if rng.integers(2):
        params['swap'] = rng.permutation(3)
    return params


def photometric_arrays(params):
    """Drawn ``params`` as the arrays ``fd3d_jax.data.device_input`` applies on the device: (5,) float32
    (brightness, contrast before the HSV round trip, saturation, hue, contrast after it; a skipped step is its
    neutral value 0 / 1, which the float32 arithmetic applies exactly) and (3,) int32, the RGB channel gather
    ``2 - swap[::-1]`` (identity when not swapped)."""
    contrast = 1.0 if params['contrast'] is None else params['contrast']
    values = (0.0 if params['brightness'] is None else params['brightness'],
              contrast if params['contrast_first'] else 1.0,
              1.0 if params['saturation'] is None else params['saturation'],
              0.0 if params['hue'] is None else params['hue'],
              1.0 if params['contrast_first'] else contrast)
    swap = np.arange(3) if params['swap'] is None else 2 - np.asarray(params['swap'])[::-1]
    return np.asarray(values, np.float32), np.asarray(swap, np.int32)


def photometric_from_params(img, params):
    """Applies drawn ``params`` to an RGB image (H, W, 3) in 0..255; returns a new float32 (H, W, 3)."""
    img = np.array(img, np.float32)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f'photometric distortion needs an (H, W, 3) image, got shape {img.shape}')
    if params['brightness'] is not None:
        img += params['brightness']
    if params['contrast_first'] and params['contrast'] is not None:
        img *= params['contrast']
    img = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    if params['saturation'] is not None:
        img[..., 1] *= params['saturation']
    if params['hue'] is not None:
        hue = img[..., 0]
        hue += params['hue']
        hue[hue > 360] -= 360
        hue[hue < 0] += 360
    img = cv2.cvtColor(img, cv2.COLOR_HSV2RGB)
    if not params['contrast_first'] and params['contrast'] is not None:
        img *= params['contrast']
    if params['swap'] is not None:
        img = np.ascontiguousarray(img[..., 2 - np.asarray(params['swap'])[::-1]])
    return img


def photometric_distortion(img, rng, brightness_delta=32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
                           hue_delta=18):
    """``PhotoMetricDistortionMultiViewImage`` on one RGB float image (H, W, 3) in 0..255 with a
    numpy Generator ``rng``; returns float32 (H, W, 3)."""
    params = photometric_params(rng, brightness_delta, contrast_range, saturation_range, hue_delta)
    return photometric_from_params(img, params)
