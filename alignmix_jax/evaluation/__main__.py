"""`python -m alignmix_jax.evaluation KIND --config=... --workdir=DIR`: the same as
`python -m alignmix_jax.evaluation.KIND ...`, with one line naming the kinds for a wrong one."""

import sys

from alignmix_jax.evaluation import KINDS


def _kind_from_argv() -> str:
    if len(sys.argv) < 2 or sys.argv[1].startswith('-'):
        raise SystemExit(f'usage: python -m alignmix_jax.evaluation KIND --config=CONFIG '
                         f'--workdir=DIR [--step=N]; the kinds are {", ".join(KINDS)}')
    kind = sys.argv.pop(1)
    if kind not in KINDS:
        raise SystemExit(f'error: unknown evaluation kind {kind!r}; the kinds are '
                         f'{", ".join(KINDS)}')
    return kind


if __name__ == '__main__':
    _selected_kind = _kind_from_argv()
    from alignmix_jax.evaluation import command

    command.run_command(_selected_kind)
