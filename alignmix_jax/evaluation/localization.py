"""Weakly-supervised localisation on CUB-200-2011: top-1 localisation and MaxBoxAcc-v2 (Table 4).

    python -m alignmix_jax.evaluation.localization --config=configs/cub_resnet50.py \\
        --workdir=DIR --config.dataset.data_dir=CUB

For every test image: the class activation map of its ground-truth class from the last
feature maps A and the classifier's weights, resized to the image (224x224) and min-max
normalised; the box of its largest region above `cam_threshold` (0.15) gives top-1
localisation (class predicted right and IoU >= 0.5) and GT-known localisation (IoU >= 0.5);
boxes around all regions at every threshold 0, 0.01, ..., 0.99 give MaxBoxAcc-v2 (Choe et al.,
2020). Definitions and the differences from Choe et al.'s code:
alignmix_jax/evaluation/cam_localization.py.

The model's head must be global average pooling followed by linear layers (the WSOL backbones
use `model.head_norm=False`); with the head's BatchNorm + ReLU (`head_norm=True`) the maps are
taken after it, where the pooling is; an embedding layer (`embedding_dim` > 0) is folded into
the classifier's weights (both are linear). The dataset must carry test boxes
(`config.dataset.name` 'cub' or 'caltech_birds2011').
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alignmix_jax.data import common as data_common
from alignmix_jax.evaluation import cam_localization, common

# CAMs are resized and normalised on the device this many at a time (one compiled shape).
_NORMALIZE_CHUNK = 32


def evaluation_order(num_examples: int, batch_size: int, process_count: int) -> np.ndarray:
    """Test-set indices in the order `common.map_batches` returns examples.

    With P processes, each global batch holds, process after process, the next `batch_size /
    P` images of each process's contiguous share (data.common.eval_batches); with one
    process it is the test set's own order.
    """
    local_size = batch_size // process_count
    bounds = data_common.share_bounds(num_examples, process_count)
    largest_share = int(np.max(np.diff(bounds)))
    order = []
    for offset in range(0, max(largest_share, 1), local_size):
        for process in range(process_count):
            start = min(bounds[process] + offset, bounds[process + 1])
            order.extend(range(start, min(start + local_size, bounds[process + 1])))
    return np.asarray(order, np.int64)


def _maps_and_logits(module, images):
    """(feature maps the pooling sees, logits): a method for `model.apply`."""
    features = module.features(images, train=False)
    logits = module.classify(module.embed(features, train=False))
    if module.use_head_norm:
        features = nn.relu(module.head_norm(features, use_running_average=True))
    return features, logits


def cam_weights(params: dict) -> jax.Array:
    """(channels of A, classes): the linear map from pooled features to logits, less biases."""
    kernel = params['classifier']['kernel']
    if 'embedding' in params:
        kernel = params['embedding']['kernel'] @ kernel
    return kernel


def _cams(context, variables, batch_index, images, labels):
    del batch_index
    features, logits = context.model.apply(variables, context.normalize(images),
                                           method=_maps_and_logits)
    maps = cam_localization.class_activation_maps(features, cam_weights(variables['params']),
                                                  labels)
    return {'cams': maps, 'predictions': jnp.argmax(logits, axis=-1)}


class Evaluator:
    """Top-1 localisation, GT-known localisation and MaxBoxAcc-v2 on the test split."""

    name = 'localization'

    def __init__(self, context: common.EvalContext, *, batch_size: int = 0,
                 cam_threshold: float = cam_localization.TOP1_CAM_THRESHOLD):
        test_boxes = getattr(context.dataset, 'test_boxes', None)
        if test_boxes is None:
            raise ValueError('localization needs test boxes: use a CUB dataset '
                             "(--config.dataset.name='cub' or 'caltech_birds2011')")
        model = context.model
        if getattr(model, 'embedding_tensor_channels', 0) or \
                getattr(model, 'decoder_type', 'none') == 'vae':
            raise ValueError('localization needs a head of global average pooling and linear '
                             'layers (no embedding tensor E, no VAE posterior)')
        self.context = context
        self.batch_size = batch_size or context.batch_size
        self.cam_threshold = float(cam_threshold)
        self.test_boxes = np.asarray(test_boxes, np.float64)
        self._cams_fn = jax.jit(functools.partial(_cams, context))
        image_size = tuple(context.image_shape[:2])
        self._normalize_fn = jax.jit(functools.partial(cam_localization.normalize_maps,
                                                       image_size=image_size))

    def run(self, variables: dict) -> dict:
        outputs = common.map_batches(self._cams_fn, variables,
                                     self.context.test_batches(self.batch_size),
                                     self.context.mesh)
        order = evaluation_order(len(self.test_boxes), self.batch_size, jax.process_count())
        boxes = self.test_boxes[order]
        cams, labels = outputs['cams'], outputs['labels']
        correct = outputs['predictions'] == labels
        scores = cam_localization.LocalizationScores(top1_threshold=self.cam_threshold)
        for start in range(0, len(cams), _NORMALIZE_CHUNK):
            chunk = cams[start:start + _NORMALIZE_CHUNK]
            padded = np.zeros((_NORMALIZE_CHUNK, *chunk.shape[1:]), chunk.dtype)
            padded[:len(chunk)] = chunk
            normalized = np.asarray(self._normalize_fn(jnp.asarray(padded)))[:len(chunk)]
            for offset, cam in enumerate(normalized):
                index = start + offset
                scores.add(cam, boxes[index], bool(correct[index]))
        results = scores.result()
        results['cam_threshold'] = self.cam_threshold
        return results

    def table(self, results: dict) -> str:
        rows = [('top-1 localization (%)', 100 * results['top1_localization']),
                ('GT-known localization (%)', 100 * results['gt_known_localization']),
                ('MaxBoxAcc-v2 (%)', 100 * results['max_box_acc_v2'])]
        for level in cam_localization.MAXBOXACC_IOU_LEVELS:
            rows.append((f'  MaxBoxAcc at IoU {level:g} (%), best threshold '
                         f'{results[f"best_threshold_iou{level:g}"]:.2f}',
                         100 * results[f'max_box_acc_iou{level:g}']))
        rows += [('top-1 classification (%)', 100 * results['top1_classification']),
                 ('test images', results['num_images']),
                 ('CAM threshold of the top-1 box', results['cam_threshold'])]
        return common.format_table(('metric', 'value'), rows)

    def write_files(self, results: dict, directory: str, name: str) -> list:
        del results, directory, name
        return []


if __name__ == '__main__':
    from alignmix_jax.evaluation import command

    command.run_command('localization')
