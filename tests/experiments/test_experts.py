"""The committed demo experts (experiments/experts/) load into the tables' FD3D configs: same model,
same image normalisation, every leaf of the right shape (a config change that orphans them fails here,
not an hour into ``make demo``)."""
import os

import pytest

from experiments.benchmark import load_config
from fd3d_jax.distill.distiller import Distiller
from fd3d_jax.distill.expert import load_expert_params
from tests.experiments import load_script

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TABLES = load_script('distill_table').TABLES


@pytest.mark.parametrize('table', ['table1', 'table2'])
def test_committed_expert_fits_its_table_config(table):
    t = TABLES[table]
    _, config = load_config(t['config'])
    expert = os.path.join(REPO, t['expert'])
    abstract = Distiller(config, abstract_only=True).expert_abstract_params
    params = load_expert_params(expert, config.expert, abstract)
    assert set(params) == set(abstract)
