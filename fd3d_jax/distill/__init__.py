"""FD3D distillation: query-guided masked generative distillation and focal distillation, and the
baselines (FitNet, MGD, the released heatmap distiller), selected by ``config.distill.method``."""

from fd3d_jax.cli import ConfigError

METHODS = ('none', 'fitnet', 'mgd', 'heatmap', 'fd3d')


def uses_expert(config):
    """True when ``config`` distils from an expert (``config.distill.method`` is not 'none')."""
    if 'distill' not in config:
        return False
    method = config.distill.method
    if method not in METHODS:
        raise ConfigError(f"config.distill.method must be one of {', '.join(METHODS)}, got {method!r}")
    return method != 'none'
