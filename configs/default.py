"""Shared defaults: AlignMix on CIFAR-10 with the paper's Appendix B settings.

Every other config starts from this one and overrides only what differs. Any field can be
overridden on the command line, e.g. `--config.train.num_epochs=3`.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.dataset = ml_collections.ConfigDict()
    # 'cifar10' | 'cifar100' (tfds), 'image_folder' (PATH/{train,test}/<class>/<image>),
    # 'demo' (the CIFAR-10 subset embedded in the package).
    config.dataset.name = 'cifar10'
    # tfds data_dir for cifar10/cifar100, the folder root for image_folder.
    config.dataset.data_dir = config_dict.placeholder(str)
    # Allow tfds to download when the data is not in data_dir (needs internet).
    config.dataset.download = True
    # Use a fixed random subset of this many training images (0: all of them).
    config.dataset.train_subset = 0
    # Classes (names or indices) removed from training and testing, the rest relabelled 0..k-1;
    # their test images are the OOD set 'held_out' of evals.ood (held-out-classes protocol).
    config.dataset.held_out_classes = ()
    # Per-channel normalisation of the public AlignMixup code (both CIFAR-10 and CIFAR-100).
    config.dataset.mean = (0.4914, 0.4822, 0.4465)
    config.dataset.std = (0.2023, 0.1994, 0.2010)
    # Augmentation: zero padding + random crop back to the input size, horizontal flip.
    config.dataset.crop_padding = 4
    config.dataset.random_flip = True
    # Optional (off by default): colour jitter as torchvision's ColorJitter(brightness,
    # contrast, saturation, hue), each factor drawn per image (hue: a shift in [-hue, hue] of
    # the colour wheel, at most 0.5), and a rotation by an angle drawn uniformly in
    # [-rotation_degrees, rotation_degrees] per image; both on the device, after crop and flip.
    config.dataset.color_jitter = (0.0, 0.0, 0.0, 0.0)
    config.dataset.rotation_degrees = 0.0

    config.model = ml_collections.ConfigDict()
    # 'preact_resnet18', 'wide_resnet16_8' (CIFAR), 'resnet50' (ImageNet), 'vgg16_gap' (CUB);
    # beyond the paper: 'vit_small', 'swin_tiny', 'mobilenet_v2' (options below).
    config.model.name = 'preact_resnet18'
    config.model.width = 1.0  # channel multiplier (0.25 for CPU-sized runs)
    # Stage-2 encoder f: global average pooling, then a fully connected layer to this many
    # dimensions (0: no fully connected layer; e is the pooled feature, 512-d for R-18).
    config.model.embedding_dim = 0
    # f as the paper defines it: a fully connected layer on the whole flattened A (to
    # embedding_dim > 0 dimensions) instead of global average pooling (the public code's head).
    config.model.flatten_features = False
    # BatchNorm + ReLU at the start of f (pre-activation networks end unnormalised).
    config.model.head_norm = True
    # Alignment resolution (paper Table 8): 'feature_pool=2' averages A to 2x2,
    # 'last_stride=1' removes the last downsampling (8x8 on CIFAR for R-18).
    config.model.last_stride = 2
    config.model.feature_pool = 1
    # Initialisation (models/layers.py): 'torchvision', each layer's own (He normal fan_out
    # convolutions, as torchvision's ResNets; what the public ImageNet code re-draws); 'pytorch',
    # PyTorch's nn.Conv2d / nn.Linear defaults, U(+-1/sqrt(fan_in)) kernels and biases, what the
    # public CIFAR and Tiny-ImageNet code keeps (configs/cifar10.py, cifar100.py, tiny_imagenet.py).
    config.model.init = 'torchvision'
    config.model.dtype = 'float32'  # 'bfloat16' on GPUs; alignment always runs in float32
    # BatchNorm statistics in training: False, each device's slice of the batch (as PyTorch's
    # DataParallel, which the public code uses); True, the global batch (cross-device means).
    config.model.sync_batch_norm = False
    # Start from converted ImageNet weights: a directory written by
    # `python -m alignmix_jax.pytorch.convert_torchvision` (None: random initialisation).
    config.model.pretrained = config_dict.placeholder(str)
    # AlignMixup/AE (paper Section 3.3, Table 8): 'ae' adds a decoder D: e -> x_hat trained by a
    # fifth mode, 'clean' (reconstruction of clean images), drawn with the mixup modes; 'vae'
    # makes e a Gaussian posterior (mu, log sigma) with a KL term. 'none': plain AlignMixup.
    config.model.decoder = 'none'
    config.model.decoder_channels = 512  # D's starting map, x width; halved by each block
    # > 0: Table 8's E, a tensor of this many channels made from A by a 2x2 stride-2
    # convolution, replaces the embedding vector (128 in the paper); mix it with the modes
    # 'embedding_tensor' and 'embedding_tensor_prime' (aligned like A when mixup.align).
    config.model.embedding_tensor_channels = 0
    # The encoders' own options, each read only by its own encoder.
    # 'preact_resnet18': what the five shape-keeping blocks add on their identity shortcut
    # (models/preact_resnet.py): 'identity', the block's input x (He et al. 2016); or
    # 'preactivated', relu(bn1(x)), as the public AlignMixup PreActResNet18 does (the CIFAR and
    # Tiny-ImageNet configs set it; configs/cifar10.py says why).
    config.model.preact_resnet18 = ml_collections.ConfigDict()
    config.model.preact_resnet18.shortcut = 'identity'
    # The backbones beyond the paper. Their width is
    # config.model.width times the base width (384 for the ViT, 96 for Swin, as DeiT-S, Swin-T).
    # 'vit_small' (DeiT-S/16): A is the grid of patch tokens (and the class token); f runs the
    # last `head_blocks` transformer blocks, the final LayerNorm and the class token (or the
    # mean patch token without one), so that what f sees depends on how A was aligned.
    config.model.vit = ml_collections.ConfigDict()
    config.model.vit.patch_size = 16  # 4 on 32x32 inputs (an 8x8 grid of tokens)
    config.model.vit.depth = 12
    config.model.vit.num_heads = 6
    config.model.vit.mlp_ratio = 4.0
    config.model.vit.class_token = True
    config.model.vit.head_blocks = 1
    # 'swin_tiny' (Swin-T): A is the last stage's feature map; f is LayerNorm + mean pooling.
    config.model.swin = ml_collections.ConfigDict()
    config.model.swin.patch_size = 4  # 2 on 32x32 inputs
    config.model.swin.depths = (2, 2, 6, 2)
    config.model.swin.num_heads = (3, 6, 12, 24)
    config.model.swin.window_size = 7  # 4 on 32x32 inputs
    config.model.swin.mlp_ratio = 4.0
    # 'mobilenet_v2': A is the output of the last 1x1 convolution (1280 channels x width).
    config.model.mobilenet_v2 = ml_collections.ConfigDict()
    # True for 32x32 inputs: the stem and the first 24-channel stage keep the resolution
    # (overall stride 8 instead of 32, so A is 4x4), as CIFAR variants of MobileNetV2 do.
    config.model.mobilenet_v2.small_input = False

    config.mixup = ml_collections.ConfigDict()
    # Modes drawn uniformly per batch (Algorithm 1); list a mode twice to double its chance.
    # 'input': mix x (Eq. 3); 'embedding': mix e (Eq. 5); 'feature': mix A with A aligned to A'
    # (Eq. 12); 'feature_prime': the same with the pair and labels swapped (Eq. 13).
    # The comparison methods of Table 1 are modes too (configs/methods.py has each method's
    # overrides): 'none', no mixup (baseline: modes=('none',)); 'cutmix', a box of x' pasted
    # into x, labels weighted by its area (CutMix: modes=('cutmix',), alpha=1.0); 'hidden1',
    # 'hidden2', 'hidden3', mix the output of stage k of F (manifold mixup:
    # modes=('input','hidden1','hidden2'), alpha=2.0); input mixup: modes=('input',), alpha=1.0.
    config.mixup.modes = ('input', 'embedding', 'feature', 'feature_prime')
    config.mixup.align = True  # False: mix A and A' without alignment (Table 8, 'unaligned')
    config.mixup.alpha = 2.0  # lambda ~ Beta(alpha, alpha)
    config.mixup.epsilon = 0.1  # entropic regularisation of Eq. (9), absolute
    config.mixup.sinkhorn_iters = 100
    # 'none': the paper (epsilon absolute on the unscaled cost). 'mean' or 'max' (beyond the
    # paper): each pair's cost divided by its mean / largest entry first, so epsilon is relative
    # to the cost's scale and 100 iterations give doubly stochastic plans on trained features.
    config.mixup.cost_scale = 'none'
    # The Sinkhorn loop: 'paper', exactly sinkhorn_iters iterations (ott-jax); 'public', the
    # public CIFAR code's loop, at most sinkhorn_iters, the batch stopping together once the
    # mean L1 change of A's potential falls below sinkhorn_threshold (logs
    # train/sinkhorn_iterations).
    config.mixup.sinkhorn = 'paper'
    config.mixup.sinkhorn_threshold = 0.1
    # feat' (Eq. 13; embedding_tensor_prime alike on E): 'fresh', its own plan from A' to A
    # (Algorithm 1); 'reuse', the plan of A to A' read backwards, A R mixed with A' on the
    # sides of (y, y') (the public CIFAR code; mixup.align_and_mix).
    config.mixup.prime_plan = 'fresh'
    # Behind an f that averages A linearly (pooling, then linear layers), aligned mixing is
    # exactly mixing the pooled features; training refuses to start there (the effect is
    # measured on the first batch, alignmix_jax/training/inert_alignment.py) unless this is True
    # (e.g. to reproduce the public code's pooled linear head on purpose).
    config.mixup.allow_inert_alignment = False
    # AlignMix + CutMix (beyond the paper): each batch is a CutMix batch with this probability
    # (0.5 in the reproduction report), else a mode drawn from `modes` as usual. 0: off.
    config.mixup.cutmix_probability = 0.0
    # CutMix's own lambda ~ Beta(cutmix_alpha, cutmix_alpha) in those batches (None: alpha).
    config.mixup.cutmix_alpha = config_dict.placeholder(float)
    # The options of timm.data.Mixup, off or neutral by default (docs/configuration.md, "Mixup
    # options").
    # Smoothing s of the labels before they are mixed: 1 - s + s/k on the class, s/k
    # elsewhere (timm's label_smoothing).
    config.mixup.label_smoothing = 0.0
    # The chance that a batch is mixed at all; the others train as the 'none' mode, clean
    # images and (smoothed) labels (timm's prob, one draw per batch).
    config.mixup.probability = 1.0
    # From this (0-based) epoch on no batch is mixed (timm's mixup_off_epoch; None: never).
    config.mixup.off_epoch = config_dict.placeholder(int)
    # 'batch': one lambda per batch (the public code); 'example': one per pair, as Algorithm 1
    # writes it (timm's mode='elem'); CutMix then pastes one box per pair.
    config.mixup.lambda_per = 'batch'

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 128
    config.train.num_epochs = 2000
    config.train.learning_rate = 0.1
    # A separate base learning rate for the classifier g (None: the same as the rest).
    config.train.classifier_learning_rate = config_dict.placeholder(float)
    # The same for the decoder D of AlignMixup/AE (None: the same as the rest; the paper does
    # not give one). Same schedule.
    config.train.decoder_learning_rate = config_dict.placeholder(float)
    config.train.lr_decay_epochs = (500, 1000, 1500)
    config.train.lr_decay_factor = 0.1
    config.train.momentum = 0.9
    config.train.nesterov = False
    config.train.weight_decay = 1e-4
    # model.decoder='vae': weight of the KL term against the reconstruction loss (both per
    # pixel value; 1 is the ELBO).
    config.train.kl_weight = 1.0
    # > 0: adds this weight times a SimCLR NT-Xent loss (Chen et al., 2020) on the embeddings e
    # of two augmented views of the clean batch to every mixup step's loss (beyond the paper).
    config.train.contrastive_weight = 0.0
    config.train.contrastive_temperature = 0.5
    config.train.eval_batch_size = 500
    config.train.eval_every_epochs = 10
    # Evaluation kinds (alignmix_jax.evaluation, options under config.evals) also run at each
    # evaluation, their figures written to TensorBoard as eval/<kind>/<name>, e.g.
    # "('calibration', 'ood')". The commands `python -m alignmix_jax.evaluation.<kind>` run the
    # same evaluators on a checkpoint.
    config.train.evals = ()
    config.train.log_every_steps = 100
    config.train.checkpoint_every_steps = 1000
    config.train.keep_checkpoints = 3
    # A restart into a workdir that holds checkpoints refuses settings other than the ones its
    # run was started with (WORKDIR/config.json; alignmix_jax/runtime/run_config.py says which);
    # True continues it with the new ones (the model and the data can never change).
    config.train.allow_config_change = False
    # Stop when a step's loss (while still finite) exceeds this factor times the lowest running
    # median of its mode's last 100 losses (at least 0.01): 1000 is far above any healthy
    # spike (alignmix_jax/training/divergence.py says why); a non-finite state or metric always
    # stops.
    config.train.loss_explosion_factor = 1000.0

    # Evaluations (alignmix_jax/evaluation): `python -m alignmix_jax.evaluation.<kind>` reads
    # these options, and `evaluation.make_evaluator(kind, context, config.evals)` passes them to
    # the kind's Evaluator. batch_size 0: train.eval_batch_size.
    config.evals = ml_collections.ConfigDict()
    config.evals.classification = ml_collections.ConfigDict()
    config.evals.classification.batch_size = 0
    # Paper Table 2 (the protocol of Kim et al. 2020): FGSM in an l-inf ball of 8/255; PGD in
    # one of 4/255, steps of 2/255; pixels in [0, 1]. PGD's 20 steps and uniform random start
    # are this project's choices (the paper gives neither).
    config.evals.robustness = ml_collections.ConfigDict()
    config.evals.robustness.batch_size = 0
    config.evals.robustness.fgsm_epsilon = 8 / 255
    config.evals.robustness.pgd_epsilon = 4 / 255
    config.evals.robustness.pgd_step_size = 2 / 255
    config.evals.robustness.pgd_steps = 20
    config.evals.robustness.pgd_random_start = True
    config.evals.robustness.num_examples = 0  # > 0: a fixed class-balanced subset of the test set
    config.evals.robustness.seed = 0  # PGD's random start
    config.evals.calibration = ml_collections.ConfigDict()
    config.evals.calibration.batch_size = 0
    config.evals.calibration.num_bins = 15  # equal-width confidence bins of ECE and OE
    # Out-of-distribution sets, scored by the maximum softmax probability: 'uniform',
    # 'gaussian' (noise images, paper Table 6), 'tfds:NAME[:SPLIT]', 'image_folder:PATH' (all
    # images below PATH, resized or centre-cropped to the input size), 'held_out' (the test
    # images of dataset.held_out_classes).
    config.evals.ood = ml_collections.ConfigDict()
    config.evals.ood.batch_size = 0
    config.evals.ood.datasets = ('uniform', 'gaussian')
    config.evals.ood.num_noise_images = 0  # 0: as many as the test set has
    config.evals.ood.seed = 0  # the noise images
    config.evals.ood.resize = 'crop'  # 'crop' (centre crop) or 'resize', for image sources
    config.evals.ood.data_dir = config_dict.placeholder(str)  # tfds data_dir of tfds sources
    # Correspondences that can be checked: the share of R's mass on the true partner cell for
    # x against x flipped left-right and x shifted by `shift_cells` cells of A (plans with the
    # config's mixup.epsilon, sinkhorn_iters and cost_scale), on a fixed subset of the test set.
    config.evals.correspondence = ml_collections.ConfigDict()
    config.evals.correspondence.batch_size = 0
    config.evals.correspondence.num_examples = 500  # 0: the whole test set
    config.evals.correspondence.shift_cells = 1
    return config
