"""``--devices N`` simulated CPU devices for a benchmark run as a script: import this module and call ``request``
before JAX is imported (XLA reads ``--xla_force_host_platform_device_count`` once, when it starts)."""
import os
import sys


def request(default=8, argv=None):
    """Sets ``XLA_FLAGS`` for the ``--devices N`` of ``argv`` (default ``sys.argv``; ``default`` without the flag)
    and the CPU platform, unless JAX is already imported (then the process keeps the devices it has)."""
    if 'jax' in sys.modules:
        return
    argv = sys.argv if argv is None else argv
    devices = default
    for index, arg in enumerate(argv):
        if arg == '--devices' and index + 1 < len(argv):
            devices = int(argv[index + 1])
        elif arg.startswith('--devices='):
            devices = int(arg.split('=', 1)[1])
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={devices}').strip()
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
