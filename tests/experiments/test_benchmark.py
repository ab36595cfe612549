"""experiments/benchmark.py: the interleaved timer."""
from experiments import benchmark


def test_interleaved_is_round_robin_and_drops_the_warmup(capsys):
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ('dense', 'sparse')}
    times = benchmark.interleaved(fns, warmup=2, iters=3, progress=True)
    # Round robin: one call of each per round, warm-up rounds first; only the timed rounds are summarised.
    assert calls == ['dense', 'sparse'] * 5
    assert {name: stats['n'] for name, stats in times.items()} == {'dense': 3, 'sparse': 3}
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(':')[0].strip() for line in lines] == (
        ['warmup dense', 'warmup sparse'] * 2 + [f'iter {i}/3 {name}' for i in (1, 2, 3) for name in ('dense', 'sparse')])


def test_interleaved_is_quiet_by_default(capsys):
    benchmark.interleaved({'only': lambda: None}, warmup=1, iters=2)
    assert capsys.readouterr().out == ''
