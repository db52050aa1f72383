"""Linear evaluation of a pretrained encoder (the paper's protocol) on CIFAR-10.

    python main.py --config=configs/linear_eval.py --config.pretrained=PRETRAIN_WORKDIR \
        --workdir=PRETRAIN_WORKDIR/eval

The encoder is frozen; a linear classifier is trained on h (head_layer=0)
with SGD, Nesterov momentum 0.9, a cosine schedule, peak learning rate
linear.learning_rate * linear.batch_size / 256 (the paper: 0.1 x B/256, no
weight decay), and top-1/top-5 are reported on the test split.

linear.cached selects how:
- True (default): on features extracted once from eval views (seconds), with
  each feature dimension standardised (see probes.train_linear_probe).
- False: the paper's full protocol (finetune.linear_eval): every step sends
  freshly augmented training images (random resized crop + flip, no colour,
  no blur) through the frozen encoder (BatchNorm in inference mode) for
  linear.epochs epochs. With linear.standardize (default) each feature
  dimension is first standardised with statistics of 10,000 augmented
  training views (fixed, so the classifier stays linear in h); False trains
  on raw h as the paper, which at this learning rate can spike on encoders
  with large features. Slower, needs an accelerator.

--config.pretrained=random gives the random-init baseline. The model section
must describe the pretrained architecture (checked). Any TFDS image
classification dataset works for transfer (--config.dataset=NAME, images are
resized to image_size), as does an image folder:
--config.dataset=folder:/path/to/root with root/<split>/<class>/*.jpg|png.
"""
import ml_collections

from configs import cifar10


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.protocol = "linear_eval"
    config.pretrained = ml_collections.config_dict.placeholder(str)  # workdir or 'random'
    config.checkpoint_step = -1  # -1: latest

    pretrain = cifar10.get_config()
    config.dataset = pretrain.dataset
    config.data_dir = ml_collections.config_dict.placeholder(str)  # or TFDS_DATA_DIR
    config.train_split = "train"
    config.test_split = "test"
    config.image_size = pretrain.image_size
    config.cache_dataset = True
    config.shuffle_buffer_size = 50_000  # training views (linear.cached=False, finetune)
    config.model = pretrain.model
    config.head_layer = 0  # 0 = h; i = output of projection-head layer i
    config.eval_batch_size = 512  # feature extraction; a multiple of the device count

    config.linear = ml_collections.ConfigDict()
    config.linear.cached = True  # False: the paper's protocol, augmented views through the encoder
    config.linear.epochs = 100
    config.linear.batch_size = 512
    config.linear.learning_rate = 0.1  # peak = learning_rate * batch_size / 256
    config.linear.weight_decay = 0.0
    config.linear.standardize = True  # linear.cached=False: standardised h (False: raw h, the paper)

    config.knn = ml_collections.ConfigDict()
    config.knn.k = 200
    config.knn.temperature = 0.1
    config.seed = 0
    # knn and cached linear_eval: workdir/embedding_tsne.png and retrieval.png.
    config.write_pictures = True
    return config
