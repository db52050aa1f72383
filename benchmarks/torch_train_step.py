"""PyTorch eager reference for benchmarks/train_step.py: the same SimCLR step.

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0
    /tmp/torchvenv/bin/python benchmarks/torch_train_step.py --batch_size=128 --image_size=32

Not part of the package, its requirements or its tests: it exists to compare
our jitted step with what a PyTorch user would run. Same work per step as the
JAX benchmark: ResNet-18 with the CIFAR stem (3x3 stride-1 first conv, no
max-pool), a 2-layer projection head with BatchNorm (512 -> 512 -> 128),
written out here so only torch is needed, both views in one forward pass, NT-Xent over the 2N views,
backward, and an SGD-momentum update (LARS's extra per-layer norms are a few
percent of a step). float32, eager, ``torch.set_num_threads`` = every core
by default. Prints one JSON object with the fields train_step.py uses.
"""
import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F


class BasicBlock(torch.nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.shortcut = torch.nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                torch.nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def simclr_model(depth: int, cifar_stem: bool) -> torch.nn.Module:
    """ResNet-18/34 (basic blocks) + the 2-layer projection head, as simclr_jax.models builds them."""
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}[depth]
    if cifar_stem:
        layers = [torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(64), torch.nn.ReLU()]
    else:
        layers = [torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
                  torch.nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for stage, count in enumerate(blocks):
        cout = 64 * 2 ** stage
        for i in range(count):
            layers.append(BasicBlock(cin, cout, 2 if stage and i == 0 else 1))
            cin = cout
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
               # the projection head g: 512 -> 512 -> 128
               torch.nn.Linear(cin, cin, bias=False), torch.nn.BatchNorm1d(cin), torch.nn.ReLU(),
               torch.nn.Linear(cin, 128, bias=False), torch.nn.BatchNorm1d(128)]
    return torch.nn.Sequential(*layers)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    z = F.normalize(z, dim=1)
    n = z.shape[0] // 2
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(logits, targets)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--cifar_stem", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = simclr_model(args.depth, args.cifar_stem).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)
    views = torch.rand(2 * args.batch_size, 3, args.image_size, args.image_size)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = nt_xent(model(views), temperature=0.1)
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = float(step())
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    print(json.dumps({
        "framework": f"torch {torch.__version__} eager", "depth": args.depth, "cifar_stem": args.cifar_stem,
        "image_size": args.image_size, "batch_size": args.batch_size, "dtype": "float32",
        "threads": args.threads, "step_seconds": seconds, "images_per_sec": args.batch_size / seconds,
        "views_per_sec": 2 * args.batch_size / seconds, "loss": loss,
    }), flush=True)


if __name__ == "__main__":
    main()
