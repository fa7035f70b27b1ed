"""Run as a script on 8 fake CPU devices by tests/test_sharding.py (XLA_FLAGS must be set
before JAX starts, so it cannot share the test process).

For each mixup mode (and the baselines' none, cutmix, hidden2), one sharded train step on 8
devices and the same computation done shard by shard on one device (`train_step.device_gradients`
with the shard's device index, averaged on the host). Then the model with synchronised
BatchNorm (`model.sync_batch_norm`) applied in training mode under shard_map, against the
unsynchronised model on the whole batch on one device. Prints one JSON object: the largest
differences of each.
"""

import json
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')

import functools  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from alignmix_jax import data
from alignmix_jax.data import augmentation
from alignmix_jax.method import mixup
from alignmix_jax.models import build_model  # noqa: E402
from alignmix_jax.runtime import sharding
from alignmix_jax.training import train_step
from tests.conftest import make_tiny_config  # noqa: E402


def max_difference(tree_a, tree_b) -> float:
    differences = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                               tree_a, tree_b)
    return max(jax.tree.leaves(differences))


def main():
    assert jax.device_count() == 8, jax.devices()
    config = make_tiny_config()
    config.train.batch_size = 32  # 4 examples on each of the 8 devices
    dataset = data.load_dataset(config.dataset)
    images, labels = dataset.train.images[:32], dataset.train.labels[:32]
    model = build_model(config.model, dataset.num_classes)
    mesh = sharding.make_mesh()
    one_device = sharding.make_mesh(jax.devices()[:1])
    sharded_step = train_step.make_train_step(model, config, mesh)
    # Compiling dominates this script (each mode's step twice: sharded and per shard), so
    # everything else is compiled once for all modes: one initial state (made on one device
    # and copied to the 8 from the host: create_train_state on the 8-device mesh would compile
    # the initialisation again), one jitted per-shard function (the mode static), one jitted
    # optimizer update.
    reference = train_step.create_train_state(config, model, images.shape[1:], 4, one_device)
    initial = jax.device_get(reference)
    shard_step = jax.jit(functools.partial(train_step.device_gradients, model=model,
                                           config=config), static_argnames='mode')
    update = jax.jit(lambda state, grads, stats: state.apply_gradients(grads=grads,
                                                                       batch_stats=stats))
    results = {}
    # AlignMix's modes and the baselines' (CutMix draws its box per device like lambda).
    for mode in mixup.MODES + ('none', 'cutmix', 'hidden2'):
        # A fresh copy each time: the step donates its input state.
        state = jax.device_put(initial, sharding.replicated(mesh))
        new_state, _ = sharded_step(state, *sharding.global_batch((images, labels), mesh),
                                    mode=mode)

        shards = [shard_step(reference, images[4 * i:4 * i + 4], labels[4 * i:4 * i + 4], i,
                             mode=mode)
                  for i in range(8)]
        grads = jax.tree.map(lambda *values: np.mean(values, axis=0), *[s[0] for s in shards])
        stats = jax.tree.map(lambda *values: np.mean(values, axis=0), *[s[1] for s in shards])
        expected = update(reference, grads, stats)
        results[mode] = {'params': max_difference(new_state.params, expected.params),
                         'batch_stats': max_difference(new_state.batch_stats,
                                                       expected.batch_stats),
                         'param_change': max_difference(expected.params, reference.params)}
    results['sync_batch_norm'] = sync_batch_norm_difference(
        config, dataset, images, mesh, {'params': initial.params,
                                        'batch_stats': initial.batch_stats})
    print(json.dumps(results))


def sync_batch_norm_difference(config, dataset, images, mesh, variables):
    """Training-mode logits and BatchNorm statistics of the sync model over 8 shards minus
    those of the plain model on the whole batch; and, as a control, the per-device model's.
    `variables`: the initial ones of the train state (a model.init here would compile the
    initialisation once more)."""
    images = augmentation.normalize(images, config.dataset.mean, config.dataset.std)
    plain = build_model(config.model, dataset.num_classes)
    synced = build_model(config.model, dataset.num_classes, batch_norm_axis=sharding.DATA_AXIS)

    def apply(model, variables, batch):
        return model.apply(variables, batch, train=True, mutable=['batch_stats'])

    def sharded(model):
        replicated, spec = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(
            sharding.DATA_AXIS)
        # Per-device statistics differ between devices: return each device's own (out_specs
        # split), and compare the synced ones, which must all equal the global ones.
        return jax.jit(jax.shard_map(
            functools.partial(apply, model), mesh=mesh, in_specs=(replicated, spec),
            out_specs=(spec, spec)))(variables, images)

    # Jitted: op by op, the whole network's forward pass compiles each of its operations.
    whole_logits, whole_stats = jax.jit(functools.partial(apply, plain))(variables, images)
    differences = {}
    for name, model in (('synced', synced), ('per_device', plain)):
        logits, stats = jax.tree.map(np.asarray, sharded(model))
        # Each device returned its statistics with the leading axis split, i.e. stacked.
        stats = jax.tree.map(lambda stacked: stacked.reshape(8, -1), stats)
        whole = jax.tree.map(lambda value: np.asarray(value).reshape(1, -1), whole_stats)
        differences[name] = {'logits': max_difference(logits, whole_logits),
                             'batch_stats': max_difference(stats, whole)}
    return differences


if __name__ == '__main__':
    main()
