"""The README's "AlignMix in your own training loop" example, run exactly as it is written."""

import math
import pathlib
import re

import jax
import numpy as np
import pytest

# Slow (left out by -m "not slow"): trains the README's example.
pytestmark = pytest.mark.slow

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'
HEADING = '## AlignMix in your own training loop'
LOSS_LINE = re.compile(r'step (\d) \((\w+)\): loss (\S+)')


def readme_section() -> str:
    text = README.read_text()
    start = text.index(HEADING)
    end = text.find('\n## ', start + len(HEADING))
    return text[start:] if end < 0 else text[start:end]


def test_readme_example_trains_and_prints_what_the_readme_says(capsys):
    section = readme_section()
    code = section.split('```python\n', 1)[1].split('\n```', 1)[0]
    namespace = {'__name__': '__readme__'}
    exec(compile(code, str(README), 'exec'), namespace)  # noqa: S102 (the README's own code)
    printed = capsys.readouterr().out.splitlines()

    runs = [LOSS_LINE.fullmatch(line) for line in printed]
    assert all(runs) and [run[2] for run in runs] == ['input', 'feature', 'feature_prime']
    losses = [float(run[3]) for run in runs]
    assert all(math.isfinite(loss) for loss in losses)
    # What the README says it prints, up to the last digits of another machine's float32.
    documented = [float(match[3]) for match in LOSS_LINE.finditer(section.split('```', 2)[2])]
    np.testing.assert_allclose(losses, documented, atol=2e-3)

    # Every parameter of F and g moved.
    before, after = namespace['params'], namespace['trained']
    assert set(before) == {'F', 'g'}
    changed = jax.tree.map(lambda old, new: bool(np.any(np.asarray(old) != np.asarray(new))),
                           before, after)
    assert all(jax.tree.leaves(changed)), changed

    # The example's alignment acts: g's logits of the aligned mix differ from those of the
    # same pair and lambda mixed without alignment (behind pooling + linear they would not).
    api, features_of, head = namespace['api'], namespace['F'], namespace['g']
    features = features_of.apply(before['F'], namespace['images'])
    key, labels = jax.random.PRNGKey(1), namespace['labels']
    aligned, unaligned = (api.mix_aligned_features(key, features, labels, 10, 2.0, align=align)
                          for align in (True, False))
    difference = np.abs(np.asarray(head.apply(before['g'], aligned.mixed))
                        - np.asarray(head.apply(before['g'], unaligned.mixed)))
    assert difference.max() > 1e-3, difference.max()
