"""Peak dense FLOP/s of accelerator chips: the one table the benchmarks read MFU against.

MFU = the FLOPs XLA's cost analysis counts for a compiled step (2 per
multiply-add) / step time / the device's peak here. Peaks are the vendors'
data-sheet figures for dense matrix maths, without 2:4 sparsity (NVIDIA
quotes sparse figures first: half of them is the dense one). 'float32' is
what JAX runs float32 convolutions and matmuls on at its default precision:
TF32 tensor cores on A100/H100/H200 and one bfloat16 pass on TPUs
(docs.jax.dev, "Matmul precision": "float32 dot products may be computed with
reduced-precision arithmetic internally (bfloat16 on TPU, TF32 on recent
GPUs)"), so the table gives those peaks; ``NON_TENSOR_FLOAT32`` keeps the
GPUs' plain float32 figures beside them.

scale.py, train_step.py and accelerator.py import this table.
"""

# chip: {dtype: dense TFLOP/s per chip}
PEAK_TFLOPS = {
    "H100 SXM": {"bfloat16": 989.0, "float32": 494.0},
    "H100 PCIe": {"bfloat16": 756.0, "float32": 378.0},
    "H200": {"bfloat16": 989.0, "float32": 494.0},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
    "v3": {"bfloat16": 123.0, "float32": 123.0},
    "v4": {"bfloat16": 275.0, "float32": 275.0},
    "v5e": {"bfloat16": 197.0, "float32": 197.0},
    "v5p": {"bfloat16": 459.0, "float32": 459.0},
    "v6e": {"bfloat16": 918.0, "float32": 918.0},
}
NON_TENSOR_FLOAT32 = {"H100 SXM": 67.0, "H100 PCIe": 51.0, "H200": 67.0, "A100": 19.5}
SOURCES = {
    "H100 SXM": "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM): BF16 Tensor Core 1,979 TFLOP/s and TF32 989 "
                "with sparsity, i.e. 989 and 494 dense; FP32 67",
    "H100 PCIe": "NVIDIA H100 datasheet (H100 PCIe): BF16 1,513 and TF32 756 with sparsity, i.e. 756 and 378 "
                 "dense; FP32 51",
    "H200": "NVIDIA H200 Tensor Core GPU datasheet (H200 SXM): BF16 1,979 and TF32 989 with sparsity, i.e. 989 "
            "and 494 dense; FP32 67",
    "A100": "NVIDIA A100 Tensor Core GPU datasheet: BF16 312, TF32 156 dense (624 / 312 with sparsity); FP32 19.5",
    "v3": "cloud.google.com/tpu/docs/v3: 123 TFLOP/s bf16 per chip (2 TensorCores, one JAX device each)",
    "v4": "cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16 per chip",
    "v5e": "cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16 per chip",
    "v5p": "cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16 per chip",
    "v6e": "cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16 per chip",
}
# jax.Device.device_kind (lower case) contains -> (chip, JAX devices per chip). First match wins: the
# more specific names lead ("h100 pcie" before "h100", "tpu v5 lite" before "tpu v5").
DEVICE_KINDS = [("h100 pcie", "H100 PCIe", 1), ("h100", "H100 SXM", 1), ("h200", "H200", 1), ("a100", "A100", 1),
                ("tpu v3", "v3", 2), ("tpu v4", "v4", 1), ("tpu v5 lite", "v5e", 1), ("tpu v5e", "v5e", 1),
                ("tpu v5", "v5p", 1), ("tpu v6", "v6e", 1)]


def chip(device_kind: str) -> tuple[str, int] | None:
    """(chip, JAX devices per chip) of a ``jax.Device.device_kind``, None when not in the table."""
    kind = device_kind.lower()
    for pattern, name, devices_per_chip in DEVICE_KINDS:
        if pattern in kind:
            return name, devices_per_chip
    return None


def peak_flops_per_device(device_kind: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of one JAX device of this kind computing in ``dtype``; None when unknown (CPUs)."""
    found = chip(device_kind)
    if found is None:
        return None
    name, devices_per_chip = found
    return PEAK_TFLOPS[name][dtype] * 1e12 / devices_per_chip


def source(device_kind: str) -> str | None:
    """Where the peak of this device kind comes from."""
    found = chip(device_kind)
    return SOURCES[found[0]] if found else None
