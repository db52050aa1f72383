"""Per-device memory of sharded kNN and the cached linear classifier at ImageNet's shape.

Compiles (never runs) both programs on abstract inputs split over 1 and over
N devices and prints XLA's memory analysis as JSON: the argument bytes of a
device fall with the device count, since each holds its bank rows only.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/knn_memory.py
"""
import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from simclr_jax import sharding  # noqa: E402
from simclr_jax.evaluation import cached_linear, knn  # noqa: E402


def _rows(shape, dtype, mesh):
    """An abstract array split on its rows over 'data', padded as extraction pads."""
    rows = -(-shape[0] // mesh.size) * mesh.size
    return jax.ShapeDtypeStruct((rows,) + shape[1:], dtype, sharding=sharding.batch_sharded(mesh))


def _report(compiled) -> dict:
    stats = compiled.memory_analysis()
    return {name: int(getattr(stats, f"{name}_size_in_bytes"))
            for name in ("argument", "output", "temp", "generated_code")}


def knn_memory(mesh, bank: int, queries: int, dim: int, classes: int, k: int, query_batch: int) -> dict:
    args = (_rows((bank, dim), jnp.float32, mesh), _rows((bank,), jnp.int32, mesh),
            _rows((queries, dim), jnp.float32, mesh), 0.1)
    lowered = knn._sharded_scores.lower(*args, mesh=mesh, num_classes=classes, k=min(k, bank),
                                        block=max(1, query_batch // mesh.size))
    return _report(lowered.compile())


def linear_memory(mesh, bank: int, dim: int, classes: int, batch: int, epochs: int) -> dict:
    replicated = NamedSharding(mesh, P())
    stats = {name: jax.ShapeDtypeStruct((dim,), jnp.float32, sharding=replicated) for name in ("mean", "inv_std")}
    args = (_rows((bank, dim), jnp.float32, mesh), _rows((bank,), jnp.int32, mesh),
            jax.ShapeDtypeStruct((bank,), jnp.int32, sharding=replicated), stats, jax.random.key(0), 0.1, 0.0)
    lowered = cached_linear._fit.lower(*args, mesh=mesh, num_classes=classes, epochs=epochs, batch_size=batch)
    return _report(lowered.compile())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=int, default=1_281_167)  # ImageNet train
    parser.add_argument("--queries", type=int, default=50_000)  # ImageNet validation
    parser.add_argument("--dim", type=int, default=2048)  # ResNet-50 h
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--query_batch", type=int, default=1024)
    parser.add_argument("--linear_batch", type=int, default=4096)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, len(jax.devices())])
    args = parser.parse_args()
    bank_bytes = args.bank * args.dim * 4
    results = []
    for count in args.devices:
        mesh = sharding.make_mesh(jax.devices()[:count])
        results.append({
            "devices": count, "bank_bytes": bank_bytes, "bank_bytes_per_device": bank_bytes / count,
            "knn": knn_memory(mesh, args.bank, args.queries, args.dim, args.classes, args.k, args.query_batch),
            "cached_linear": linear_memory(mesh, args.bank, args.dim, args.classes, args.linear_batch, epochs=1)})
        print(json.dumps(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    main()
