"""Tests of the scripts in ``experiments/`` (not a package: loaded from their paths)."""
import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_script(name):
    """The module ``experiments/NAME.py``."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'experiments', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
