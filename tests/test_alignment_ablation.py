"""The ablation of alignment (`reproduce --ablation=alignment`) on a tiny budget."""

import json

import pytest

from alignmix_jax.experiments import alignment_ablation
from tests.conftest import make_tiny_config


def test_conditions_set_the_alignment_and_the_head():
    assert alignment_ablation.conditions()[:6] == [
        'off_pooled_linear', 'off_bn_relu', 'paper_pooled_linear', 'paper_bn_relu',
        'converged_pooled_linear', 'converged_bn_relu']
    off = alignment_ablation.make_config('off_pooled_linear', data_dir='/data')
    assert (off.mixup.align, off.model.head_norm, off.mixup.allow_inert_alignment,
            off.dataset.data_dir) == (False, False, True, '/data')
    converged = alignment_ablation.make_config('converged_bn_relu')
    assert (converged.mixup.align, converged.mixup.cost_scale, converged.model.head_norm,
            converged.mixup.allow_inert_alignment) == (True, 'mean', True, False)
    with pytest.raises(ValueError, match='unknown ablation condition .bogus.; valid: off_'):
        alignment_ablation.conditions(['bogus'])


@pytest.mark.slow  # compiles or trains for many seconds (see docs/testing.md)
def test_tiny_ablation_tabulates_the_effect_of_each_condition(tmp_path):
    def make_run_config(condition):
        config = alignment_ablation.make_config(condition)
        tiny = make_tiny_config()
        config.dataset, config.train = tiny.dataset, tiny.train
        config.dataset.train_subset = 32
        config.train.num_epochs, config.train.lr_decay_epochs = 1, ()
        config.train.log_every_steps = 1
        config.model.width = 0.0625
        config.mixup.modes = ('feature',)  # one compiled step per run
        return config

    names = ['paper_pooled_linear', 'paper_bn_relu', 'off_bn_relu', 'public_bn_relu']
    summary = alignment_ablation.run_ablation(make_run_config, names, [0], str(tmp_path),
                                              command='tiny')
    assert list(summary) == names
    assert summary['paper_pooled_linear']['alignment_effect'] < 1e-4  # inert, as measured
    assert summary['paper_bn_relu']['alignment_effect'] > 1e-2
    assert summary['paper_bn_relu']['marginal_error'] > 0
    assert summary['off_bn_relu']['alignment_effect'] is None
    # Only the public loop logs its iteration count: at most 100, at least 1.
    assert summary['paper_bn_relu']['sinkhorn_iterations'] is None
    assert 1 <= summary['public_bn_relu']['sinkhorn_iterations'] <= 100
    table = (tmp_path / 'ablation.md').read_text().splitlines()
    assert table[2].startswith('| paper | pooled_linear | ')
    assert table[4].startswith('| off | bn_relu | ') and '| - | - | - |' in table[4]
    saved = json.loads((tmp_path / 'ablation.json').read_text())
    assert saved['summary']['paper_bn_relu']['final_test_accuracy'] == \
        summary['paper_bn_relu']['final_test_accuracy']
