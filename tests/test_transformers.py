"""The transformer backbones (ViT, Swin): stages, sizes, token alignment, windows, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmix_jax import data
from alignmix_jax.method import mixup
from alignmix_jax.models import Classifier, build_model
from alignmix_jax.models.classifier import ENCODER_OPTIONS
from alignmix_jax.models.swin import SwinBlock
from alignmix_jax.models.vit import PatchTokens
from alignmix_jax.runtime import sharding
from alignmix_jax.training import train_step
from tests.conftest import fit_one_batch, init_key, make_tiny_config

BATCH, SIZE, CLASSES = 2, 32, 10
# Tiny versions of the CIFAR settings (configs/default.py): ViT patch 4 (an 8x8 token grid),
# 24-d tokens; Swin patch 2, window 4, 6 channels in stage 1.
WIDTH = 1 / 16
VIT_OPTIONS = dict(patch_size=4, depth=5, num_heads=2, head_blocks=1)  # one block per stage
SWIN_OPTIONS = dict(patch_size=2, depths=(2, 1, 1, 1), num_heads=(2, 2, 4, 4), window_size=4)


def classifier(name, options, **fields):
    return Classifier(num_classes=CLASSES, encoder_name=name, width=WIDTH, use_head_norm=False,
                      encoder_options=tuple(options.items()), **fields)


def images(seed=0, batch=BATCH, size=SIZE):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, size, size, 3))


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def assert_split_invariance(model, variables, x, stages):
    """features(features(x, stop=k), start=k) == features(x), and stage k changes its input."""
    features = model.apply(variables, x, train=False, method='features')
    previous = x
    for level in range(1, stages):
        hidden = model.apply(variables, x, train=False, method='features', stop=level)
        rest = model.apply(variables, hidden, train=False, method='features', start=level)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                     rest, features)
        grid, previous_grid = jax.tree.leaves(hidden)[0], jax.tree.leaves(previous)[0]
        if grid.shape == previous_grid.shape:
            assert not np.allclose(grid, previous_grid), level
        previous = hidden


@pytest.mark.parametrize('class_token', [True, False])
def test_vit_stages_are_patch_tokens_and_split_anywhere(class_token):
    model = classifier('vit_small', dict(VIT_OPTIONS, class_token=class_token))
    x = images()
    variables = model.init(init_key(0), x, train=False)
    dim = 24  # 384 / 16
    for level in range(1, 5):
        tokens = model.apply(variables, x, train=False, method='features', stop=level)
        assert isinstance(tokens, PatchTokens)
        assert tokens.grid.shape == (BATCH, 8, 8, dim)
        if class_token:
            assert tokens.class_token.shape == (BATCH, dim)
        else:
            assert tokens.class_token is None
    assert_split_invariance(model, variables, x, 4)
    assert model.apply(variables, x, train=False).shape == (BATCH, CLASSES)
    embedding = model.apply(variables, model.apply(variables, x, train=False, method='features'),
                            train=False, method='embed')
    assert embedding.shape == (BATCH, dim)
    params = variables['params']['encoder']
    assert params['position_embedding']['embedding'].shape == (64 + class_token, dim)
    assert ('class_token' in params) == class_token
    assert {f'block{index}' for index in range(1, 6)} <= set(params)


@pytest.mark.parametrize('last_stride, feature_pool, last_side',
                         [(1, 1, 4), (2, 1, 2), (1, 2, 2)])
def test_swin_stage_shapes_and_split(last_stride, feature_pool, last_side):
    model = classifier('swin_tiny', SWIN_OPTIONS, last_stride=last_stride,
                       feature_pool=feature_pool)
    x = images()
    variables = model.init(init_key(1), x, train=False)
    expected = [(16, 6), (8, 12), (4, 24), (last_side, 48)]
    for level, (side, channels) in enumerate(expected, start=1):
        hidden = model.apply(variables, x, train=False, method='features', stop=level)
        assert hidden.shape == (BATCH, side, side, channels), level
    assert_split_invariance(model, variables, x, 4)
    assert model.apply(variables, x, train=False).shape == (BATCH, CLASSES)
    params = variables['params']['encoder']
    # A 4x4 window on the 16x16 and 8x8 grids; the 4x4 (or 2x2) grids are one window.
    assert params['stage1_block2']['relative_position_bias_table'].shape == (7 * 7, 2)
    assert params['stage4_block1']['relative_position_bias_table'].shape == \
        ((2 * (4 // last_stride) - 1) ** 2, 4)
    # The stride-1 merging maps each token alone (C -> 2C); the stride-2 one a 2x2 cell (4C).
    assert params['stage4_merging']['reduction']['kernel'].shape == \
        ((24 if last_stride == 1 else 96), 48)


def full_size_count(name):
    model = Classifier(num_classes=1000, encoder_name=name, use_head_norm=False)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((1, 224, 224, 3)), train=False))
    return count(shapes['params']), shapes['params']


def test_full_size_parameter_counts_match_timm():
    # timm's deit_small_patch16_224: patch embedding 295,296, class token 384, positions
    # 197 x 384 = 75,648, 12 blocks of 1,774,464, final norm 768, head 385,000.
    vit_count, vit_params = full_size_count('vit_small')
    assert vit_count == 22_050_664
    assert vit_params['encoder']['position_embedding']['embedding'].shape == (197, 384)
    # timm's swin_tiny_patch4_window7_224 with its relative position bias tables (169 x heads
    # per block) and without the relative position index buffers.
    swin_count, swin_params = full_size_count('swin_tiny')
    assert swin_count == 28_288_354
    assert swin_params['encoder']['stage3_block6']['relative_position_bias_table'].shape == \
        (169, 12)


def test_bfloat16_computes_in_bfloat16_with_float32_parameters():
    for name, options in (('vit_small', VIT_OPTIONS), ('swin_tiny', SWIN_OPTIONS)):
        model = classifier(name, options, dtype=jnp.bfloat16)
        x = jnp.zeros((BATCH, SIZE, SIZE, 3))
        variables = jax.eval_shape(lambda model=model, x=x: model.init(init_key(0), x,
                                                                       train=False))
        assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}

        def stages(variables, x, model=model):
            features = model.apply(variables, x, train=False, method='features')
            embedding = model.apply(variables, features, train=False, method='embed')
            return features, embedding, model.apply(variables, embedding, method='classify')

        features, embedding, logits = jax.eval_shape(stages, variables, x)
        assert {leaf.dtype for leaf in jax.tree.leaves(features)} == {jnp.dtype(jnp.bfloat16)}
        assert embedding.dtype == jnp.bfloat16 and logits.dtype == jnp.float32


def test_invalid_options_raise_one_line_errors():
    def init(name, options, size=SIZE, **fields):
        model = classifier(name, options, **fields)
        return jax.eval_shape(lambda: model.init(init_key(0), jnp.zeros((1, size, size, 3)),
                                                 train=False))

    with pytest.raises(ValueError, match='model.last_stride=2 and model.feature_pool=1'):
        init('vit_small', VIT_OPTIONS, last_stride=1)
    with pytest.raises(ValueError, match=r'head_blocks must lie in \[0, depth=5\]; got 6'):
        init('vit_small', dict(VIT_OPTIONS, head_blocks=6))
    with pytest.raises(ValueError, match='patch_size=4 does not divide the 30x30 images'):
        init('vit_small', VIT_OPTIONS, size=30)
    with pytest.raises(ValueError, match='window_size=3 does not divide the 16x16 token grid; '
                                         'change model.swin.window_size'):
        init('swin_tiny', dict(SWIN_OPTIONS, window_size=3))
    with pytest.raises(ValueError, match='num_heads=5 does not divide the 6 channels'):
        init('swin_tiny', dict(SWIN_OPTIONS, num_heads=(5, 2, 4, 4)))


def test_vit_tokens_are_aligned_and_the_class_token_mixed_linearly():
    """Partner = the anchor's own patch tokens shuffled, with another class token: aligned, the
    partner's grid is the anchor's again, so the mixed grid is the anchor's for any lambda."""
    model = classifier('vit_small', VIT_OPTIONS)
    x = images(3)
    variables = model.init(init_key(2), x, train=False)
    tokens = model.apply(variables, x, train=False, method='features')
    grid = tokens.grid[0].reshape(64, -1)
    # Scaled so that any two tokens are far apart (squared distance >= 50) next to eps = 0.1:
    # the entropic plan is then the permutation itself.
    squared = jnp.sum((grid[:, None] - grid[None]) ** 2, -1) + jnp.eye(64) * 1e9
    grid = grid * jnp.sqrt(50.0 / jnp.min(squared))
    shuffle = jax.random.permutation(jax.random.PRNGKey(4), 64)
    assert not np.array_equal(shuffle, np.arange(64))
    pair = PatchTokens(jnp.stack([grid, grid[shuffle]]).reshape(2, 8, 8, -1),
                       tokens.class_token)  # class tokens of two different images
    lam = 0.3
    mixed, plan = mixup.mix_features(pair, jnp.array([1, 0]), lam, swap=False, align=True,
                                     epsilon=0.1, num_iters=100)
    assert isinstance(mixed, PatchTokens) and plan.shape == (2, 64, 64)
    # Row i of the anchor's plan puts all its mass on the shuffled position of token i.
    np.testing.assert_allclose(plan[0] * 64, jnp.eye(64)[jnp.argsort(shuffle)], atol=1e-4)
    scale = float(jnp.max(jnp.abs(grid)))
    np.testing.assert_allclose(mixed.grid[0], pair.grid[0], atol=1e-4 * scale)
    np.testing.assert_allclose(mixed.grid[1], pair.grid[1], atol=1e-4 * scale)
    class_tokens = np.asarray(tokens.class_token)
    np.testing.assert_allclose(mixed.class_token[0],
                               lam * class_tokens[0] + (1 - lam) * class_tokens[1], rtol=1e-6)
    np.testing.assert_allclose(mixed.class_token[1],
                               lam * class_tokens[1] + (1 - lam) * class_tokens[0], rtol=1e-6)


@pytest.mark.parametrize('head_blocks', [0, 1])
def test_vit_head_sees_the_alignment_through_its_blocks(head_blocks):
    """f(mix(A, A aligned)) differs from f(mix(A, A')) only if f has transformer blocks: with
    head_blocks=0, e is the normalised class token, blind to the patch tokens."""
    model = classifier('vit_small', dict(VIT_OPTIONS, head_blocks=head_blocks))
    x = images(5)
    variables = model.init(init_key(3), x, train=False)
    tokens = model.apply(variables, x, train=False, method='features')

    def embedding(align):
        mixed, _ = mixup.mix_features(tokens, jnp.array([1, 0]), 0.5, swap=False, align=align,
                                      epsilon=0.1, num_iters=100)
        return model.apply(variables, mixed, train=False, method='embed')

    difference = float(jnp.max(jnp.abs(embedding(True) - embedding(False))))
    assert (difference > 1e-4) == (head_blocks > 0), difference


def changed_positions(block, variables, x, row, column):
    # One channel: a shift of all channels alike would vanish in the LayerNorm.
    perturbed = x.at[0, row, column, 0].add(3.0)
    difference = jnp.abs(block.apply(variables, perturbed) - block.apply(variables, x))
    return np.asarray(jnp.max(difference[0], axis=-1) > 1e-6)


def test_swin_window_attention_is_local_and_the_shift_mask_holds():
    """One token changed on an 8x8 grid (window 4): exactly the outputs of its window change.
    Shifted windows start at rows/columns 2 and 6 (mod 8); the window that wraps around the
    border holds four regions the mask keeps apart."""
    x = jax.random.normal(jax.random.PRNGKey(6), (1, 8, 8, 8))
    plain = SwinBlock(num_heads=2, window_size=4, shifted=False)
    shifted = SwinBlock(num_heads=2, window_size=4, shifted=True)
    variables = plain.init(init_key(4), x)  # the same parameters serve both

    def expected(rows, columns):
        region = np.zeros((8, 8), bool)
        region[np.ix_(rows, columns)] = True
        return region

    np.testing.assert_array_equal(changed_positions(plain, variables, x, 0, 0),
                                  expected(range(0, 4), range(0, 4)))
    np.testing.assert_array_equal(changed_positions(plain, variables, x, 5, 5),
                                  expected(range(4, 8), range(4, 8)))
    np.testing.assert_array_equal(changed_positions(shifted, variables, x, 5, 5),
                                  expected(range(2, 6), range(2, 6)))
    # Token (0, 0) shares a shifted window with rows and columns 6, 7 but is masked from them.
    np.testing.assert_array_equal(changed_positions(shifted, variables, x, 0, 0),
                                  expected(range(0, 2), range(0, 2)))
    np.testing.assert_array_equal(changed_positions(shifted, variables, x, 7, 0),
                                  expected(range(6, 8), range(0, 2)))
    np.testing.assert_array_equal(changed_positions(shifted, variables, x, 3, 7),
                                  expected(range(2, 6), range(6, 8)))


def test_swin_block_matches_a_written_out_reference():
    """One window (a 4x4 grid, window 4): LayerNorm, attention with the bias of each offset
    read from the table by hand, residual, LayerNorm, exact-GELU MLP, residual."""
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 4, 4, 8))
    block = SwinBlock(num_heads=2, window_size=4)
    variables = block.init(init_key(5), x)
    rng = np.random.default_rng(8)  # nonzero biases, LayerNorm shifts and bias table
    params = jax.tree.map(lambda leaf: np.asarray(leaf) + np.float32(0.1) * rng.standard_normal(
        leaf.shape, np.float32), variables['params'])

    def layer_norm(values, norm):
        mean = values.mean(-1, keepdims=True)
        variance = values.var(-1, keepdims=True)
        return (values - mean) / np.sqrt(variance + 1e-5) * norm['scale'] + norm['bias']

    tokens = np.asarray(x).reshape(2, 16, 8)
    normed = layer_norm(tokens, params['norm1'])
    attention = params['attention']
    query, key, value = (np.einsum('btc,chd->bthd', normed, attention[name]['kernel'])
                         + attention[name]['bias'] for name in ('query', 'key', 'value'))
    logits = np.einsum('bqhd,bkhd->bhqk', query, key) / np.sqrt(4)
    table = params['relative_position_bias_table']
    for i in range(16):
        for j in range(16):
            dy, dx = i // 4 - j // 4, i % 4 - j % 4
            logits[:, :, i, j] += table[(dy + 3) * 7 + (dx + 3)]
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum('bhqk,bkhd->bqhd', weights, value)
    out = tokens + np.einsum('bqhd,hdc->bqc', attended, attention['out']['kernel']) \
        + attention['out']['bias']
    mlp = params['mlp']
    hidden = layer_norm(out, params['norm2']) @ mlp['dense1']['kernel'] + mlp['dense1']['bias']
    hidden = np.asarray(jax.nn.gelu(hidden, approximate=False))
    out = out + hidden @ mlp['dense2']['kernel'] + mlp['dense2']['bias']
    np.testing.assert_allclose(block.apply({'params': params}, x), out.reshape(2, 4, 4, 8),
                               rtol=1e-4, atol=1e-4)


# ViT: two F-blocks, in stages 2 and 4, so that 'hidden2' differs from 'input' (the embedding
# is linear: mixing images mixes their embeddings, so 'hidden1' equals 'input' here), and a
# head block. Swin: one shifted block in stage 1, A 4x4 as in the CIFAR setting.
TRAIN_OPTIONS = {'vit_small': dict(VIT_OPTIONS, depth=3), 'swin_tiny': SWIN_OPTIONS}
ALL_MODES = ('none', 'input', 'embedding', 'feature', 'feature_prime', 'cutmix', 'hidden1',
             'hidden2', 'hidden3')
# Every mode on the ViT, whose representations are PatchTokens. Swin's are arrays, which every
# mode already handles for the ResNets, and a Swin step takes ~15 s to compile here (4 stages
# of distinct shapes; the ViT's blocks are all alike): two modes, the aligned A and a hidden
# stage behind a patch merging.
TRAIN_MODES = {'vit_small': ALL_MODES, 'swin_tiny': ('feature', 'hidden2')}


def gradient_share(initial: np.ndarray, trained: np.ndarray) -> float:
    """The part of the change of a kernel that weight decay cannot explain, relative to its size:
    decay and momentum alone keep the kernel a multiple of its initial value."""
    initial, trained = initial.ravel(), trained.ravel()
    decayed = (trained @ initial) / (initial @ initial) * initial
    return float(np.linalg.norm(trained - decayed) / np.linalg.norm(trained))


@pytest.mark.slow  # compiles or trains for many seconds (see docs/testing.md)
@pytest.mark.parametrize('name', ['vit_small', 'swin_tiny'])
def test_each_mode_trains_the_transformer_and_compiles_once(name):
    config = make_tiny_config()
    config.model.name = name
    config.model.head_norm = False
    config.model.width = WIDTH
    if name == 'swin_tiny':
        config.model.last_stride = 1
    for option, value in TRAIN_OPTIONS[name].items():
        config.model[ENCODER_OPTIONS[name]][option] = value  # config.model.vit or .swin
    dataset = data.load_dataset(config.dataset)
    model = build_model(config.model, dataset.num_classes)
    images, labels = dataset.train.images[:16], dataset.train.labels[:16]
    mesh = sharding.make_mesh()
    step_fn = train_step.make_train_step(model, config, mesh)
    for mode in TRAIN_MODES[name]:
        first_metrics, later_metrics, initial, trained = fit_one_batch(
            step_fn, config, model, images, labels, mesh, mode, updates=6)
        initial_kernel = initial['encoder']['patch_embedding']['kernel']
        trained_kernel = trained['encoder']['patch_embedding']['kernel']
        assert float(later_metrics['loss']) < 0.8 * float(first_metrics['loss']), mode
        # In 6 steps these networks learn mostly the label frequencies (g's bias): check that
        # the gradient reached F's first layer through the mode's mixing as well.
        assert gradient_share(initial_kernel, trained_kernel) > 1e-2, mode
        if mode in mixup.FEATURE_MODES:
            assert np.isfinite(float(first_metrics['marginal_error'])), mode
        else:
            assert 'marginal_error' not in first_metrics
    assert step_fn._cache_size() == len(TRAIN_MODES[name])
