"""Linear evaluation of a pretrained encoder (the paper's protocol) on CIFAR-10.

    python main.py --config=configs/linear_eval.py --config.pretrained=PRETRAIN_WORKDIR \
        --workdir=PRETRAIN_WORKDIR/eval

The encoder is frozen; a linear classifier is trained on h (head_layer=0).
This recipe trains it on features extracted once from eval views (seconds),
SGD with Nesterov momentum and a cosine schedule, and reports top-1/top-5 on
the test split. --config.pretrained=random gives the random-init baseline.
The model section must describe the pretrained architecture (checked).
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
    config.data_dir = pretrain.data_dir
    config.train_split = "train"
    config.test_split = "test"
    config.image_size = pretrain.image_size
    config.cache_dataset = True
    config.model = pretrain.model
    config.head_layer = 0  # 0 = h; i = output of projection-head layer i
    config.eval_batch_size = 512  # feature extraction; a multiple of the device count

    config.linear = ml_collections.ConfigDict()
    config.linear.epochs = 100
    config.linear.batch_size = 512
    config.linear.learning_rate = 0.1  # peak = learning_rate * batch_size / 256
    config.linear.weight_decay = 0.0

    config.knn = ml_collections.ConfigDict()
    config.knn.k = 200
    config.knn.temperature = 0.1
    config.seed = 0
    return config
