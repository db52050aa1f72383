"""Views per second of the standard torchvision (PIL) SimCLR pipeline, on one core.

The baseline for benchmarks/input_pipeline.py: the same images, the same
JSON fields, a torch DataLoader in the main process (num_workers=0) with
torch.set_num_threads(1). torch is not in requirements.txt, so it runs from
its own virtual environment:

    python3 -m venv /work/torchvenv
    /work/torchvenv/bin/pip install torch==2.13.0 torchvision pillow numpy
    .venv/bin/python benchmarks/input_pipeline.py --prepare_only   # writes the inputs to /tmp
    /work/torchvenv/bin/python benchmarks/torch_input_pipeline.py  # the 4 standard configurations
    /work/torchvenv/bin/python benchmarks/torch_input_pipeline.py --image_size=224 --blur=1

Per view: RandomResizedCrop(size, scale=(0.08, 1)) -> RandomHorizontalFlip ->
RandomApply(ColorJitter(0.8s, 0.8s, 0.8s, 0.2s), p=0.8) -> RandomGrayscale(0.2)
-> RandomApply(GaussianBlur(10% kernel, sigma (0.1, 2)), p=0.5) if blur ->
ToTensor; the interpolation is torchvision's default (bilinear) unless
--interpolation=bicubic. Sources, as in the TF benchmark:
- 32 px, s = 0.5: real CIFAR-10 train images from the .npy that
  --prepare_only wrote (uint8 in memory -> PIL.Image.fromarray, as
  torchvision's CIFAR10 dataset does);
- 224 px, s = 1.0: the upscaled CIFAR-10 JPEG folder, each image read and
  decoded once with PIL (.convert('RGB'), as ImageFolder does) for its 2 views.

Prints one JSON object per configuration: config (image_size, blur, source,
jpeg_size, batch_size, library), threads (1), views_per_sec,
views_per_sec_per_core, seconds (timed part, after --warmup_batches),
cpu_seconds and views_per_cpu_sec (process CPU time over the same views) and
load_avg_start (1-minute load average at the start).
"""
import argparse
import importlib.util
import json
import os
import sys
import time
import types

import numpy as np
import PIL
import torch
from PIL import Image


def _import_transforms():
    """torchvision.transforms, and how it was imported.

    The only torchvision 0.28 wheel this machine's pip offers is built against
    CUDA torch: its C ops (nms, roi_align; libc10_cuda.so) cannot load on the
    CPU build of torch 2.13, and ``import torchvision`` then fails while
    registering them. The transforms used here are pure Python (PIL, plus
    torch conv2d for the blur), so in that case they are imported from the
    installed package with its ``__init__`` (the C-op registration) skipped.
    """
    try:
        import torchvision
        from torchvision import transforms
        return transforms, f"torchvision {torchvision.__version__}"
    except (RuntimeError, OSError):
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        package = types.ModuleType("torchvision")
        package.__path__ = list(importlib.util.find_spec("torchvision").submodule_search_locations)
        sys.modules["torchvision"] = package
        from torchvision import transforms
        from torchvision.version import __version__
        return transforms, (f"torchvision {__version__} transforms "
                            "(C ops not loadable: __init__ skipped)")


T, TORCHVISION = _import_transforms()


def view_transform(size, strength, blur, interpolation):
    ops = [
        T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=interpolation),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8 * strength, 0.8 * strength, 0.8 * strength,
                                     0.2 * strength)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if blur:
        ops.append(T.RandomApply([T.GaussianBlur(2 * (size // 10 // 2) + 1, sigma=(0.1, 2.0))],
                                 p=0.5))
    ops.append(T.ToTensor())
    return T.Compose(ops)


class TwoViews(torch.utils.data.Dataset):
    """(views [2, 3, S, S], label); ``load(i)`` gives the PIL image of item i."""

    def __init__(self, load, labels, transform):
        self.load, self.labels, self.transform = load, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.load(i)
        return torch.stack([self.transform(image), self.transform(image)]), self.labels[i]


def make_dataset(args, size, blur):
    interpolation = T.InterpolationMode[args.interpolation.upper()]
    if size == 32:
        path = os.path.join(args.tmp_dir, "simclr_bench_cifar10_train.npy")
        if not os.path.exists(path):
            raise SystemExit(f"{path} missing: run benchmarks/input_pipeline.py --prepare_only")
        images = np.load(path)
        transform = view_transform(size, 0.5, blur, interpolation)
        return TwoViews(lambda i: Image.fromarray(images[i]), [0] * len(images),
                        transform), "cifar10_real", None
    root = os.path.join(args.tmp_dir, f"simclr_bench_jpeg_n{args.num_jpegs}_{args.jpeg_size}_q90")
    if not os.path.exists(os.path.join(root, "DONE")):
        raise SystemExit(f"{root} missing: run benchmarks/input_pipeline.py --prepare_only")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "train"))
                   for f in fs if f.endswith(".jpg"))
    transform = view_transform(size, 1.0, blur, interpolation)

    def load(i):
        with open(files[i], "rb") as f:
            return Image.open(f).convert("RGB")

    return TwoViews(load, [0] * len(files), transform), "jpeg_upscaled", args.jpeg_size


def measure(args, size, blur):
    load_avg = os.getloadavg()[0]
    dataset, source, jpeg_size = make_dataset(args, size, blur)
    num_views = args.num_views or (16384 if size == 32 else 1024)
    num_batches = max(1, -(-num_views // (2 * args.batch_size)))
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True,
                                             num_samples=10**9)  # endless
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                                         num_workers=0, drop_last=True)
    it = iter(loader)
    for _ in range(args.warmup_batches):
        next(it)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        views, _ = next(it)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    assert views.shape == (args.batch_size, 2, 3, size, size), views.shape
    rate = num_batches * 2 * args.batch_size / seconds
    return {
        "config": {"image_size": size, "blur": blur, "source": source, "jpeg_size": jpeg_size,
                   "batch_size": args.batch_size,
                   "library": f"torch {torch.__version__}, {TORCHVISION}, PIL {PIL.__version__}, "
                              f"{args.interpolation}"},
        "threads": 1,
        "views_per_sec": round(rate, 1),
        "views_per_sec_per_core": round(rate, 1),
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "views_per_cpu_sec": round(num_batches * 2 * args.batch_size / cpu_seconds, 1),
        "load_avg_start": round(load_avg, 2),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image_size", type=int, choices=(32, 224), help="omitted: both")
    parser.add_argument("--blur", type=int, choices=(0, 1), help="omitted: both")
    parser.add_argument("--num_views", type=int, help="omitted: 16384 (32 px), 1024 (224 px)")
    parser.add_argument("--batch_size", type=int, default=128, help="images (2 views each)")
    parser.add_argument("--warmup_batches", type=int, default=2)
    parser.add_argument("--interpolation", default="bilinear", choices=("bilinear", "bicubic"))
    parser.add_argument("--jpeg_size", default="400x350")
    parser.add_argument("--num_jpegs", type=int, default=1000)
    parser.add_argument("--tmp_dir", default="/tmp")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    sizes = (32, 224) if args.image_size is None else (args.image_size,)
    blurs = (False, True) if args.blur is None else (bool(args.blur),)
    for size in sizes:
        for blur in blurs:
            print(json.dumps(measure(args, size, blur)), flush=True)


if __name__ == "__main__":
    main()
