"""Evaluations of a trained classifier, one module per kind, sharing `evaluation.common`.

Each kind is a command that reads the latest (or a given) checkpoint of a workdir, prints a
table and writes `WORKDIR/eval/<kind>.json`:

    python -m alignmix_jax.evaluation.<kind> --config=configs/demo.py --workdir=DIR [--step=N]

and an evaluator class that a training loop can call on its current variables:

    evaluator = evaluation.make_evaluator(kind, context, config.evals)
    results = evaluator.run({'params': ..., 'batch_stats': ...})  # {name: figure}

The interface (`Evaluator`, `EvalContext`, loading, batching) is described in
`evaluation/common.py`; the command is `evaluation/command.py`. Importing this package loads
no kind; `make_evaluator` imports the one it needs.
"""

import importlib

from alignmix_jax.settings.config_choices import EVALUATION_KINDS as KINDS


def evaluator_class(kind: str):
    """The Evaluator class of `kind`; ValueError naming the kinds if there is no such kind."""
    if kind not in KINDS:
        raise ValueError(f'unknown evaluation kind {kind!r}; the kinds are {", ".join(KINDS)}')
    return importlib.import_module(f'alignmix_jax.evaluation.{kind}').Evaluator


def make_evaluator(kind: str, context, evals_config):
    """`Evaluator(context, **evals_config[kind])` of `kind` (its defaults: configs/default.py)."""
    options = evals_config[kind].to_dict() if kind in evals_config else {}
    return evaluator_class(kind)(context, **options)
