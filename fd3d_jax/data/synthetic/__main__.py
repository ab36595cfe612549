"""python -m fd3d_jax.data.synthetic --out DIR [--scenes N] [--seed S] [--image-size W H]"""
import argparse
import sys

from fd3d_jax.data.synthetic import generate


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m fd3d_jax.data.synthetic', description=__doc__)
    parser.add_argument('--out', required=True, help='output dataroot')
    parser.add_argument('--scenes', type=int, default=10)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--image-size', type=int, nargs=2, default=(320, 180), metavar=('W', 'H'))
    parser.add_argument('--workers', type=int, default=None, help='processes (default: all cores)')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace a synthetic set with other parameters in --out')
    args = parser.parse_args(argv)
    try:
        info = generate(args.out, args.scenes, args.seed, args.image_size, args.workers, args.overwrite)
    except (ValueError, FileExistsError) as error:
        sys.exit(f'error: {error}')
    print(f'version: {info["version"]}')
    for split, scenes in info['splits'].items():
        print(f'split {split}: {len(scenes)} scenes ({", ".join(scenes)})')


if __name__ == '__main__':
    main()
