"""SimCLR on CIFAR-10: ResNet-18 with the CIFAR stem, the paper's CIFAR recipe.

Batch 512, 1000 epochs, LARS with base learning rate 1.0 (linear scaling:
1.0 * 512/256 = 2.0 peak), 10 warm-up epochs, temperature 0.5, colour
strength 0.5 and no blur, as in the paper's appendix B.9 and the official
repository's CIFAR-10 command (which also sets weight decay 1e-4).
Expected: ~91% linear-evaluation top-1 after 1000 epochs on the lossless data.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Data. data_dir=None lets TFDS resolve it (honouring TFDS_DATA_DIR).
    config.dataset = "cifar10"
    config.data_dir = ml_collections.config_dict.placeholder(str)
    config.download = True  # let TFDS download and prepare the data if it is not there yet
    config.train_split = "train"
    config.image_size = 32
    config.color_jitter_strength = 0.5
    config.blur = False
    config.shuffle_buffer_size = 50_000
    config.cache_dataset = True  # decoded CIFAR-10 is 150 MB: keep it in memory

    # Model.
    config.model = ml_collections.ConfigDict()
    config.model.depth = 18
    config.model.width_multiplier = 1.0
    config.model.cifar_stem = True
    config.model.head_layers = 2  # SimCLR v1 head; 3 for v2
    config.model.proj_dim = 128
    # 'official': google-research/simclr's ResNet (a projection shortcut on the
    # first block of every group); 'torchvision': only where the shape changes.
    config.model.variant = "torchvision"
    config.model.sk_ratio = 0.0  # selective kernels + ResNet-D (SimCLR v2: 0.0625)
    config.model.se_ratio = 0.0  # squeeze-excitation
    # Recompute each residual block in the backward pass instead of storing its
    # activations: a larger batch in the same memory, for about a third more compute.
    config.model.remat = False
    config.dtype = "float32"  # compute dtype; parameters and loss stay float32
    # Start from these weights instead of random ones (encoder, head, BatchNorm
    # statistics): one of our pretraining workdirs or an official SimCLR TF2
    # checkpoint of the same architecture. A resumed run ignores it.
    config.init_from = ml_collections.config_dict.placeholder(str)

    # Objective and optimiser.
    config.batch_size = 512  # global, over all devices and processes
    config.num_epochs = 1000
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.temperature = 0.5
    config.loss_impl = "auto"  # NT-Xent: 'naive', 'blockwise' (memory-light), 'auto'
    config.microbatches = 1  # > 1: model in chunks per device, all negatives kept (memory-light; BN per chunk)
    # SimCLR v2's memory (MoCo's queue): a moving average of encoder and head
    # makes key projections of every batch, and the latest `size` of them are
    # extra negatives for every anchor. 0 = off; else a multiple of 2 * batch_size.
    config.memory = ml_collections.ConfigDict()
    config.memory.size = 0
    config.memory.momentum = 0.999
    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.base_learning_rate = 1.0
    config.optimizer.lr_scaling = "linear"  # peak = base * batch / 256
    config.optimizer.warmup_epochs = 10.0
    config.optimizer.weight_decay = 1e-4
    config.optimizer.momentum = 0.9
    config.optimizer.trust_coefficient = 1e-3

    # Monitoring with labels, when the dataset has them (never used for the
    # encoder's gradient): an online linear probe on stop_gradient(h), and a
    # weighted kNN (k=200, T=0.1) of test images against the train split.
    config.online_probe = True
    config.probe_learning_rate = 1e-3  # Adam, for the probe only
    config.knn_monitor = True
    config.eval_every_epochs = 50.0  # the monitors run this often and at the end; 0 = only at the end
    config.test_split = "test"
    config.eval_batch_size = 512  # feature extraction; a multiple of the device count
    config.knn = ml_collections.ConfigDict()
    config.knn.k = 200
    config.knn.temperature = 0.1

    # Bookkeeping.
    config.seed = 0
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    # A non-finite loss or gradient: 'stop' (with the step and the last good
    # checkpoint), or 'skip' the update and go on.
    config.nonfinite_policy = "stop"
    # workdir/augmentations.png (and TensorBoard): two views of a few images.
    config.write_pictures = True
    return config
