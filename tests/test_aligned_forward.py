"""The aligned modes (A and Table 8's tensor E) train on the labels of what they mixed.

A model whose A and E are each image's one-hot label at every position, and whose f and g
average the positions, makes the mixed tensor readable: its logits are exactly the mixture of
labels the mixed tensor is made of. Constant tensors make every plan uniform, so alignment
moves nothing and the mixture is the lambda-weighted pair, whichever side the plan aligns.
Each aligned mode, with every Sinkhorn loop and plan of feat', must then train on targets equal
to those logits: Eq. (13) mixes (A', A~') with (y', y), and the public code's reused plan mixes
A R with A' on the sides of (y, y').
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmix_jax.training import mode_forward
from configs import default

NUM_CLASSES = 6
GRID = 2  # a 2 x 2 grid, r = 4 positions, as E on CIFAR


class LabelGrid(nn.Module):
    """F: the input itself, a (b, 2, 2, k) grid holding a label; E = A; f and g average the
    positions, so e and the logits are the label mixture the mixed tensor holds."""

    @nn.compact
    def features(self, images, train: bool):
        # One BatchNorm-like statistic, so the stages return statistics as a real model's do.
        batches = self.variable('batch_stats', 'batches', lambda: jnp.zeros((), jnp.int32))
        if train and not self.is_initializing():
            batches.value += 1
        return images

    def embed_to_tensor(self, features, train: bool):
        del train
        return features

    def embed(self, features, train: bool):
        del train
        return self.flatten_embedding(features)

    def flatten_embedding(self, tensor):
        return jnp.mean(tensor.reshape(tensor.shape[0], -1, tensor.shape[-1]), axis=1)

    def classify(self, embedding):
        return embedding


def label_grids(labels):
    one_hot = jax.nn.one_hot(labels, NUM_CLASSES)
    return one_hot, jnp.broadcast_to(one_hot[:, None, None, :],
                                     (labels.shape[0], GRID, GRID, NUM_CLASSES))


@pytest.mark.parametrize('sinkhorn', ['paper', 'public'])
@pytest.mark.parametrize('prime_plan', ['fresh', 'reuse'])
@pytest.mark.parametrize('mode', ['feature', 'feature_prime', 'embedding_tensor',
                                  'embedding_tensor_prime'])
def test_each_aligned_mode_trains_on_the_labels_of_what_it_mixed(mode, prime_plan, sinkhorn):
    mixup_config = default.get_config().mixup
    mixup_config.prime_plan = prime_plan
    mixup_config.sinkhorn = sinkhorn
    labels = jnp.array([0, 1, 2, 3, 4, 5])
    permutation = jnp.array([3, 0, 5, 1, 2, 4])
    one_hot, images = label_grids(labels)
    model = LabelGrid()
    variables = model.init(jax.random.PRNGKey(0), images, train=False, method='features')
    for lam in (jnp.float32(0.3), jnp.linspace(0.1, 0.9, 6, dtype=jnp.float32)):
        forward = mode_forward.mixed_forward(
            mode, model, {}, variables['batch_stats'], images, one_hot, permutation, lam,
            mixup_config)
        logits, targets = forward.logits, forward.targets
        # The content: lambda on one image's label, 1 - lambda on its partner's (not 1/2).
        assert float(jnp.max(logits)) == pytest.approx(float(jnp.max(jnp.maximum(
            lam, 1 - lam))), abs=1e-5)
        np.testing.assert_allclose(targets, logits, atol=1e-5)
        # Both tensors are aligned by the configured loop: r = 4 positions, one plan a pair.
        assert forward.plan.shape == (6, GRID * GRID, GRID * GRID)
        assert (forward.sinkhorn_iterations is not None) == (sinkhorn == 'public')
