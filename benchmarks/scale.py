"""Projection on paper: SimCLR ResNet-50 (batch 4096, 224 px, bfloat16) on a pod.

    python benchmarks/scale.py --cache=/tmp/scale.json                 # ~2-4 min of CPU compiles, then instant
    python benchmarks/scale.py --cache=/tmp/scale.json --mfu=0.3 --latency_us=20   # other assumptions
    TPU_LIBRARY_PATH=/tmp/libtpu/libtpu/libtpu.so python benchmarks/scale.py --tpu_topology=v5p:4x4x4 \
        --cache=/tmp/scale.json                                      # + the TPU compiler's figures, D = 64

Prints one JSON object on stdout (a table on stderr) with:

  flops          XLA's cost analysis of the compiled real train step (the
                 step pretraining runs: configs/imagenet.py, LARS + the online
                 probe, global BN, NT-Xent over gathered projections), per
                 device and for the whole step, at every compiled device count
                 D, beside an analytic count. XLA counts 2 FLOPs per
                 multiply-add; so does every FLOP figure here.
  collectives    bytes each device all-reduces, all-gathers, reduce-scatters
                 per step at D = 8 .. 512: by construction (below), checked
                 against the collectives parsed from the compiled HLO at each
                 D compiled here (measured == construction is printed).
  platforms      predicted time per ImageNet epoch (1,281,167 images) on TPU
                 v5e / v5p slices, an 8x H100 node, and the paper's 128 TPU v3
                 cores, beside the paper's own figure.
  assumptions    every constant used, with its source or "assumption".

Nothing runs: the step is compiled from abstract inputs
(jax.ShapeDtypeStruct), on forced host CPU devices by default
(--xla_force_host_platform_device_count, set here before the backend starts),
and with --tpu_topology also for abstract TPU devices, all of the topology's
chips (needs libtpu, not a requirement: see benchmarks/memory.py; one
ResNet-50 TPU compile takes minutes on 2 cores). The step is data parallel with the
state replicated, so FLOPs per device are the step's / D, and the collectives
are, per device and step (f32 but where said):
  gradients      all-reduce of every parameter's gradient, float32 (the step
                 sums them before any cast to the compute dtype), constant in D
  BN statistics  global BatchNorm: forward all-reduces of mean and variance
                 (4 * 2 * channels per BN layer), and as many in the backward
                 pass (their cotangents): constant in D
  projections    all-gather of both views' z, [2N, 128] (4 MiB at N = 4096),
                 and its transpose, a reduce-scatter of the same size:
                 constant in D at a fixed global batch
  scalars        loss and metric means
Payload bytes are constant in D; bytes on the wire per device are
2 (D-1)/D * payload for an all-reduce and (D-1)/D * payload for an all-gather
or reduce-scatter (bandwidth-optimal algorithms), so they barely grow with D,
while the compute per device falls as 1/D: communication's share grows with D.

Time per step: compute = FLOPs / (D * peak * MFU); each collective costs
wire bytes / bandwidth + a latency. --combine=overlap (default): the gradient
all-reduce overlaps the backward pass (XLA schedules it asynchronously, layer
gradients being ready long before the step ends), the rest is on the critical
path (each BN layer waits for its statistics; the loss waits for the gathered
projections): max(compute, gradients) + BN + projections + scalars. 'sum'
(no overlap) and 'max' (perfect overlap) bound it and are reported too.

No TensorFlow is imported (asserted at the end).
"""
import json
import math
import os
import re
import sys
import time

from absl import app, flags

# Lets `python benchmarks/scale.py` import the package from a checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import peaks  # noqa: E402
from configs import imagenet  # noqa: E402
from simclr_jax import models, optim, sharding  # noqa: E402
from simclr_jax.pretraining import step, train  # noqa: E402
from simclr_jax.weights.checkpoint import PROBE  # noqa: E402

flags.DEFINE_list("compile_devices", ["8", "16", "32", "64", "128", "256", "512"],
                  "Device counts to compile the step at (forced host CPU devices, or the TPU topology's first D).")
flags.DEFINE_list("devices", ["8", "16", "32", "64", "128", "256", "512"], "Device counts of the collectives table.")
flags.DEFINE_string("tpu_topology", None, "Also compile for this TPU topology's chips, e.g. v5p:4x4x4 (libtpu).")
flags.DEFINE_integer("batch_size", None, "Global batch; default configs/imagenet.py's (4096).")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype (parameters stay float32).")
flags.DEFINE_integer("probe_classes", 1000, "Online probe classes, as pretraining on ImageNet uses (0: none).")
flags.DEFINE_float("mfu", 0.4, "Assumed model FLOP utilisation of the compute part (assumption).")
flags.DEFINE_float("latency_us", 10.0, "Assumed fixed cost of one collective in microseconds (assumption).")
flags.DEFINE_float("bandwidth_scale", 1.0, "Multiplies every platform's assumed interconnect bandwidth.")
flags.DEFINE_enum("combine", "overlap", ["overlap", "sum", "max"], "How compute and communication combine.")
flags.DEFINE_string("cache", None, "JSON file of compiled figures, read and extended: reruns skip compiles.")
FLAGS = flags.FLAGS

IMAGENET_TRAIN_IMAGES = 1_281_167
PAPER = {"epochs": 100, "hours": 1.5, "tpu_v3_cores": 128, "batch_size": 4096,
         "source": "Chen et al. 2020, 'A Simple Framework for Contrastive Learning of Visual Representations', "
                   "section 2.2: 'Training with 4096 batch size for 100 epochs takes ~1.5 hours with 128 TPU v3 cores'"}
# Forward multiply-adds of ResNet-50 at 224 px (torchvision's, stride on the 3x3 conv as our
# 'torchvision' variant; He et al. 2016 Table 1 quotes 3.8e9 for the stride-on-1x1 original).
R50_FORWARD_MACS = 4.09e9
# name: JAX devices, devices per chip, peak dense bf16 TFLOP/s per chip, interconnect GB/s per chip.
PLATFORMS = {
    "v5e-64": {"chips": 64, "devices_per_chip": 1, "chip": "v5e"},
    "v5e-256": {"chips": 256, "devices_per_chip": 1, "chip": "v5e"},
    "v5p-128": {"chips": 64, "devices_per_chip": 1, "chip": "v5p"},  # v5p-N counts TensorCores, 2 per chip
    "v5p-256": {"chips": 128, "devices_per_chip": 1, "chip": "v5p"},
    "v5p-512": {"chips": 256, "devices_per_chip": 1, "chip": "v5p"},
    "v5p-1024": {"chips": 512, "devices_per_chip": 1, "chip": "v5p"},
    "8x H100 SXM": {"chips": 8, "devices_per_chip": 1, "chip": "H100 SXM"},
    "v3-128 (the paper's)": {"chips": 64, "devices_per_chip": 2, "chip": "v3"},  # one JAX device per core
}


def _chip(name: str, bandwidth_gb_s: float, interconnect: str) -> dict:
    """A chip's peak dense bfloat16 TFLOP/s (benchmarks/peaks.py, the benchmarks' one
    table) and its all-reduce bandwidth per chip, with where each figure comes from."""
    return {"peak_tflops": peaks.PEAK_TFLOPS[name]["bfloat16"], "bandwidth_gb_s": bandwidth_gb_s,
            "source": f"{peaks.SOURCES[name]}; {interconnect}"}


CHIPS = {
    "v5e": _chip("v5e", 200.0, "'all-reduce bandwidth per Pod 51.2 TB/s' / 256 chips = 200 GB/s per chip "
                 "(bidirectional ICI 400 GB/s per chip)"),
    "v5p": _chip("v5p", 600.0, "bidirectional ICI 1200 GB/s per chip, halved to one direction = 600 GB/s "
                 "(assumption: the docs give no all-reduce figure)"),
    "H100 SXM": _chip("H100 SXM", 450.0, "NVLink 4 900 GB/s bidirectional per GPU, halved to one direction = "
                      "450 GB/s (assumption)"),
    "v3": _chip("v3", 332.0, "'all-reduce bandwidth per Pod 340 TB/s' / 1024 chips = 332 GB/s per chip"),
}

HLO_CHECK_NOTE = (
    "CPU: all-gather and reduce-scatter match the construction exactly; the all-reduces total 1.0008x it "
    "(99,584 bytes more at every D, not attributed: XLA:CPU combines the float32 gradient sum with the "
    "BatchNorm all-reduces into a few tuple all-reduces, so the parts cannot be told apart in the HLO). "
    "TPU (--tpu_topology; v5p:4x4x4, D=64, compiled once, before the step summed gradients in float32): no "
    "all-gather or reduce-scatter is left; the compiler turns both projection collectives into all-reduces of "
    "the zero-padded [4096, 128] arrays (the forward one in bfloat16: it gathers z before the row-wise float32 "
    "cast and normalisation), which moves about twice the all-gather's bytes on the wire.")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def setup_backend(max_devices: int) -> None:
    """Forces ``max_devices`` host CPU devices. Must run before the backend starts."""
    jax.config.update("jax_platforms", "cpu")  # compile-only: never a local accelerator's runtime
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in xla_flags:
        os.environ["XLA_FLAGS"] = f"{xla_flags} --xla_force_host_platform_device_count={max_devices}"


def target_devices(target: str, count: int | None = None) -> list:
    """The first ``count`` (default: all) devices of 'cpu' or 'tpu:<topology>' (compile-only)."""
    if target == "cpu":
        devices = jax.devices()
    else:
        from jax.experimental import topologies
        devices = topologies.get_topology_desc(target.partition(":")[2], "tpu",
                                               chips_per_host_bounds=(1, 1, 1)).devices
    count = len(devices) if count is None else count
    if len(devices) < count:
        raise ValueError(f"{target} has {len(devices)} devices, {count} asked for")
    return devices[:count]


def experiment_config():
    config = imagenet.get_config()
    if FLAGS.batch_size:
        config.batch_size = FLAGS.batch_size
    return config


def build(config, mesh):
    """(jitted train step, abstract state, abstract batch), as pretraining builds them."""
    model = models.model_from_config(config.model, axis_name=sharding.DATA_AXIS, dtype=jnp.dtype(FLAGS.dtype))
    tx, learning_rate = train.create_optimizer(config, IMAGENET_TRAIN_IMAGES // config.batch_size)
    if FLAGS.probe_classes:
        tx = optim.with_adam_for(PROBE, tx, config.probe_learning_rate)
    train_step = step.make_train_step(model, tx, learning_rate=learning_rate, temperature=config.temperature,
                                      mesh=mesh, num_classes=FLAGS.probe_classes,
                                      loss_impl=config.loss_impl, microbatches=config.microbatches)
    shapes = jax.eval_shape(lambda: step.create_train_state(model, tx, image_size=config.image_size, seed=0, mesh=mesh,
                                                            num_classes=FLAGS.probe_classes))
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding.replicated(mesh)),
                         shapes)
    size, n = config.image_size, config.batch_size
    batch = {"views": jax.ShapeDtypeStruct((n, 2, size, size, 3), jnp.float32, sharding=sharding.batch_sharded(mesh))}
    if FLAGS.probe_classes:
        batch["label"] = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding.batch_sharded(mesh))
    return train_step, state, batch


def hlo_collectives(hlo: str) -> dict:
    """{kind: {ops, bytes}} of one device's compiled HLO.

    Bytes are the payload: an all-reduce's array, an all-gather's gathered
    output, a reduce-scatter's full input. Combined (tuple) ops count each
    element. Async '-start' ops count, their '-done' halves do not.
    """
    out = {}
    pattern = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.+?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
    for line in hlo.splitlines():
        match = pattern.match(line)
        if not match:
            continue
        kind = match.group(2)
        shapes = [DTYPE_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
                  for t, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", match.group(1)) if t in DTYPE_BYTES]
        if match.group(3) and kind == "all-gather":  # all-gather-start: (operands, outputs)
            shapes = shapes[len(shapes) // 2:]
        if kind == "reduce-scatter":
            shapes = [b * group_size(line) for b in shapes]
        entry = out.setdefault(kind, {"ops": 0, "bytes": 0})
        entry["ops"] += 1
        entry["bytes"] += sum(shapes)
    return out


def group_size(line: str) -> int:
    """Devices in a collective's (first) replica group: {{0,1,..}} or the iota form [G,S]<=[..]."""
    groups = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if groups:
        return len(groups.group(1).split(","))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    if iota:
        return int(iota.group(2))
    raise ValueError(f"no replica groups in {line[:200]}")


def compile_figures(config, target: str, devices: int) -> dict:
    """FLOPs and collectives of one device of the step compiled for ``devices`` devices."""
    mesh = sharding.make_mesh(target_devices(target, devices))
    train_step, state, batch = build(config, mesh)
    start = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a dict in jax 0.10; a list of one before
    return {"flops_per_device": float(cost["flops"]), "compile_seconds": round(seconds, 1),
            "device_kind": mesh.devices.flat[0].device_kind,
            "collectives": hlo_collectives(compiled.as_text())}


class Memo:
    """compile_figures, remembered in a JSON file (--cache): reruns are instant."""

    def __init__(self, path: str | None):
        self.path, self.entries = path, {}
        if path and os.path.exists(path):
            with open(path) as f:
                self.entries = json.load(f)

    def __call__(self, config, target: str, devices: int) -> dict:
        key = json.dumps([jax.__version__, target, devices, config.batch_size, config.image_size,
                          config.model.to_dict(), FLAGS.dtype, FLAGS.probe_classes, config.loss_impl])
        if key not in self.entries:
            print(f"  compiling for {target} D={devices} ...", file=sys.stderr, flush=True)
            self.entries[key] = compile_figures(config, target, devices)
            print(f"    {self.entries[key]['compile_seconds']} s", file=sys.stderr, flush=True)
            if self.path:
                with open(self.path + ".tmp", "w") as f:
                    json.dump(self.entries, f)
                os.replace(self.path + ".tmp", self.path)
        return self.entries[key]


def model_sizes(config) -> dict:
    """Parameter count and the BatchNorm layers' channels of the real model and probe (shapes only)."""
    mesh = sharding.make_mesh(jax.devices()[:1])
    _, state, _ = build(config, mesh)
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    bn_means = [x for path, x in jax.tree_util.tree_leaves_with_path(state.batch_stats)
                if getattr(path[-1], "key", None) == "mean"]
    return {"params": params, "bn_layers": len(bn_means),
            "bn_channels": sum(x.shape[-1] for x in bn_means)}


def construction(sizes: dict, config, devices: int) -> dict:
    """Per device and step: {category: {kind, ops, payload_bytes, wire_bytes, overlaps}}."""
    f32 = 4
    projections = 2 * config.batch_size * config.model.proj_dim * f32  # both views' z, gathered
    scalars = 3 + (2 if FLAGS.probe_classes else 0)  # loss, contrastive acc / entropy (+ probe loss / acc)
    all_reduce, gather = 2 * (devices - 1) / devices, (devices - 1) / devices
    rows = {
        "gradients": ("all-reduce", None, sizes["params"] * f32, all_reduce, True),
        "bn_forward": ("all-reduce", 2 * sizes["bn_layers"], 2 * sizes["bn_channels"] * f32, all_reduce, False),
        "bn_backward": ("all-reduce", 2 * sizes["bn_layers"], 2 * sizes["bn_channels"] * f32, all_reduce, False),
        "scalars": ("all-reduce", 1, scalars * f32, all_reduce, False),
        "projection_gather": ("all-gather", 2, projections, gather, False),
        "projection_scatter": ("reduce-scatter", 2, projections, gather, False),
    }
    return {name: {"kind": kind, "ops": ops, "payload_bytes": payload, "wire_bytes": payload * factor,
                   "overlaps_compute": overlaps}
            for name, (kind, ops, payload, factor, overlaps) in rows.items()}


def check(built: dict, measured: dict) -> dict:
    """Construction's payload per collective kind beside the compiled HLO's."""
    out = {}
    for kind in ("all-reduce", "all-gather", "reduce-scatter"):
        expected = sum(r["payload_bytes"] for r in built.values() if r["kind"] == kind)
        got = measured.get(kind, {}).get("bytes", 0)
        ops = measured.get(kind, {}).get("ops", 0)
        out[kind] = {"construction_bytes": expected, "hlo_bytes": got, "hlo_ops": ops,
                     "ratio": round(got / expected, 5) if expected else None}
    return out


def analytic_flops(config) -> dict:
    """2 FLOPs per multiply-add x (forward + backward = 3 forwards) x 2 views x batch, encoder only."""
    per_step = 2 * R50_FORWARD_MACS * 3 * 2 * config.batch_size
    return {"flops_per_step": per_step, "formula": "2 FLOP/MAC * 4.09e9 MAC * 3 (fwd+bwd) * 2 views * batch"}


def step_time(flops: float, built: dict, devices: int, peak: float, bandwidth: float, mfu: float,
              latency: float) -> dict:
    """Seconds of one step on ``devices`` devices of ``peak`` FLOP/s and ``bandwidth`` bytes/s each."""
    compute = flops / (devices * peak * mfu)
    comm = {name: r["wire_bytes"] / bandwidth + (r["ops"] or 0) * latency for name, r in built.items()}
    overlapped = sum(t for name, t in comm.items() if built[name]["overlaps_compute"])
    serial = sum(t for name, t in comm.items() if not built[name]["overlaps_compute"])
    return {"compute_s": compute, "comm_s": comm, "overlap": max(compute, overlapped) + serial,
            "sum": compute + overlapped + serial, "max": max(compute, overlapped + serial)}


def platform_table(flops_at, sizes: dict, config) -> dict:
    """``flops_at(D)``: the step's FLOPs (all devices) compiled for D devices."""
    steps_per_epoch = IMAGENET_TRAIN_IMAGES / config.batch_size
    out = {}
    for name, p in PLATFORMS.items():
        chip = CHIPS[p["chip"]]
        devices = p["chips"] * p["devices_per_chip"]
        flops = flops_at(devices)
        built = construction(sizes, config, devices)
        peak = chip["peak_tflops"] * 1e12 / p["devices_per_chip"]
        bandwidth = chip["bandwidth_gb_s"] * 1e9 * FLAGS.bandwidth_scale / p["devices_per_chip"]
        t = step_time(flops, built, devices, peak, bandwidth, FLAGS.mfu, FLAGS.latency_us * 1e-6)
        out[name] = {"chips": p["chips"], "devices": devices, "per_device_batch": config.batch_size / devices,
                     "step_s": {k: t[k] for k in ("overlap", "sum", "max")}, "compute_s": t["compute_s"],
                     "comm_s": t["comm_s"], "epoch_s": t[FLAGS.combine] * steps_per_epoch,
                     "epoch_s_bounds": [t["max"] * steps_per_epoch, t["sum"] * steps_per_epoch],
                     "comm_share": 1 - t["compute_s"] / t[FLAGS.combine]}
    paper_epoch = PAPER["hours"] * 3600 / PAPER["epochs"]
    v3 = out["v3-128 (the paper's)"]
    v3["paper_epoch_s"] = paper_epoch
    # The MFU at which compute alone would take the paper's epoch time.
    peak = v3["chips"] * CHIPS["v3"]["peak_tflops"] * 1e12
    v3["paper_implied_mfu"] = flops_at(v3["devices"]) * steps_per_epoch / (paper_epoch * peak)
    return out


def assumptions(config, sizes: dict) -> dict:
    return {
        "global_batch": {"value": config.batch_size, "source": "configs/imagenet.py"},
        "image_size": {"value": config.image_size, "source": "configs/imagenet.py"},
        "model": {"value": config.model.to_dict(), "source": "configs/imagenet.py (head: configs/cifar10.py)"},
        "compute_dtype": {"value": FLAGS.dtype, "source": "flag; parameters, BN statistics and projections "
                          "are float32 (models/, losses.py), and so are the gradients all-reduced (step.py)"},
        "online_probe_classes": {"value": FLAGS.probe_classes, "source": "configs: online_probe=True, ImageNet's "
                                 "1000 classes (its 2048x1000 kernel adds 8 MB to the gradient all-reduce)"},
        "params": {"value": sizes["params"], "source": "the train state's shapes (encoder, head, probe)"},
        "bn_layers": {"value": sizes["bn_layers"], "source": "the train state's batch_stats"},
        "imagenet_train_images": {"value": IMAGENET_TRAIN_IMAGES, "source": "ILSVRC-2012 train split"},
        "steps_per_epoch": {"value": IMAGENET_TRAIN_IMAGES / config.batch_size,
                            "source": "images / batch (fractional; pretraining runs floor(...) = "
                                      f"{IMAGENET_TRAIN_IMAGES // config.batch_size} steps per epoch)"},
        "r50_forward_macs": {"value": R50_FORWARD_MACS, "source": "torchvision ResNet-50 model card ('GFLOPS "
                             "4.09', multiply-adds); analytic cross-check only"},
        "flop_convention": {"value": "2 FLOPs per multiply-add", "source": "XLA's cost analysis; used throughout"},
        "mfu": {"value": FLAGS.mfu, "source": "assumption (flag --mfu)"},
        "latency_per_collective_s": {"value": FLAGS.latency_us * 1e-6, "source": "assumption (flag --latency_us)"},
        "bandwidth_scale": {"value": FLAGS.bandwidth_scale, "source": "flag"},
        "combine": {"value": FLAGS.combine, "source": "flag; overlap = max(compute, gradient all-reduce) + the "
                    "collectives on the critical path (BN statistics, projections, scalars)"},
        "collective_algorithm": {"value": "bandwidth-optimal: all-reduce moves 2(D-1)/D x payload per device, "
                                 "all-gather / reduce-scatter (D-1)/D x payload", "source": "assumption (ring / "
                                 "reduce-scatter + all-gather; a torus runs it over several rings at once)"},
        "chips": {name: dict(c, bandwidth_gb_s=c["bandwidth_gb_s"] * FLAGS.bandwidth_scale)
                  for name, c in CHIPS.items()},
        "devices_per_chip": {"value": {"v3": 2, "others": 1}, "source": "v3: one JAX device per TensorCore (the "
                             "paper's 128 cores = 64 chips); v5p megacore, v5e and H100: one per chip. A v3 "
                             "core gets half its chip's peak and bandwidth (assumption)"},
        "paper": {"value": {k: v for k, v in PAPER.items() if k != "source"}, "source": PAPER["source"]},
    }


def print_table(result: dict) -> None:
    err = lambda s="": print(s, file=sys.stderr)
    f = result["flops"]
    err(f"\nFLOPs per step (2 per multiply-add): XLA {f['xla_flops_per_step'] / 1e12:.1f} TFLOP, analytic "
        f"{f['analytic_flops_per_step'] / 1e12:.1f} TFLOP (ratio {f['xla_over_analytic']:.3f})")
    for c in f["compiled"]:
        err(f"  {c['target']:>12} D={c['devices']:>4}: {c['flops_per_device'] / 1e12:8.3f} TFLOP per device, x D = "
            f"{c['flops_per_device'] * c['devices'] / 1e12:6.1f}  (compile {c['compile_seconds']} s)")
    err("\nCollectives per device per step (payload MB; wire MB = what one device sends):")
    err(f"{'D':>5}{'grad AR':>10}{'BN AR':>9}{'gather':>9}{'scatter':>9}{'wire MB':>10}{'  HLO check (AR / AG / RS)'}")
    for d, row in result["collectives"].items():
        c = row["construction"]
        wire = sum(r["wire_bytes"] for r in c.values())
        line = (f"{d:>5}{c['gradients']['payload_bytes'] / 1e6:>10.1f}"
                f"{(c['bn_forward']['payload_bytes'] + c['bn_backward']['payload_bytes']) / 1e6:>9.2f}"
                f"{c['projection_gather']['payload_bytes'] / 1e6:>9.2f}"
                f"{c['projection_scatter']['payload_bytes'] / 1e6:>9.2f}{wire / 1e6:>10.1f}")
        for target, h in row.get("hlo_check", {}).items():
            err(line + f"  {target}: " + " / ".join(
                f"{h[k]['hlo_bytes'] / 1e6:.3f} ({h[k]['ratio']}x, {h[k]['hlo_ops']} ops)"
                for k in ("all-reduce", "all-gather", "reduce-scatter")))
            line = " " * len(line)
        if not row.get("hlo_check"):
            err(line)
    err(f"\nTime per ImageNet epoch at MFU {FLAGS.mfu}, {FLAGS.latency_us} us per collective, "
        f"combine={FLAGS.combine} (bounds: perfect overlap .. none):")
    err(f"{'platform':>22}{'D':>5}{'b/dev':>7}{'compute ms':>12}{'comm ms':>9}{'step ms':>9}{'epoch s':>9}"
        f"{'bounds s':>16}{'comm %':>8}")
    for name, p in result["platforms"].items():
        comm = sum(p["comm_s"].values())
        lo, hi = p["epoch_s_bounds"]
        err(f"{name:>22}{p['devices']:>5}{p['per_device_batch']:>7.0f}{p['compute_s'] * 1e3:>12.2f}"
            f"{comm * 1e3:>9.2f}{p['step_s'][FLAGS.combine] * 1e3:>9.2f}{p['epoch_s']:>9.1f}"
            f"{f'{lo:.1f}..{hi:.1f}':>16}{100 * p['comm_share']:>8.1f}")
    v3 = result["platforms"]["v3-128 (the paper's)"]
    err(f"\nPaper: 100 epochs in ~1.5 h on 128 TPU v3 cores = {v3['paper_epoch_s']:.0f} s per epoch; predicted "
        f"{v3['epoch_s']:.1f} s at MFU {FLAGS.mfu}. Compute alone at the paper's time = MFU "
        f"{v3['paper_implied_mfu']:.3f}.")


def main(argv):
    del argv
    compile_counts = sorted(int(d) for d in FLAGS.compile_devices)
    if not compile_counts:
        raise ValueError("--compile_devices is empty: the FLOPs come from a CPU compile")
    setup_backend(max(compile_counts))
    config = experiment_config()
    memo = Memo(FLAGS.cache)
    sizes = model_sizes(config)
    targets = [("cpu", d) for d in compile_counts]
    if FLAGS.tpu_topology:
        tpu = "tpu:" + FLAGS.tpu_topology
        targets.append((tpu, len(target_devices(tpu))))
    compiled = [dict(memo(config, target, d), target=target, devices=d) for target, d in targets]
    # The step's FLOPs, all devices: the CPU compile at D, else at the nearest D compiled. Not quite
    # constant: the optimiser update is replicated, ~1 GFLOP per device whatever D.
    cpu = {c["devices"]: c["flops_per_device"] * c["devices"] for c in compiled if c["target"] == "cpu"}
    flops_at = lambda d: cpu[min(cpu, key=lambda k: abs(math.log(k / d)))]
    flops = cpu[compile_counts[0]]
    analytic = analytic_flops(config)
    result = {
        "model": "SimCLR ResNet-50 (configs/imagenet.py)", "global_batch": config.batch_size,
        "image_size": config.image_size, "dtype": FLAGS.dtype,
        "flops": {"xla_flops_per_step": flops, "analytic_flops_per_step": analytic["flops_per_step"],
                  "analytic_formula": analytic["formula"], "xla_over_analytic": flops / analytic["flops_per_step"],
                  "per_device": "xla_flops_per_step / D (data parallel: each device runs batch / D images)",
                  "compiled": compiled},
        "collectives": {},
    }
    for d in sorted({int(x) for x in FLAGS.devices} | {d for _, d in targets}):
        built = construction(sizes, config, d)
        result["collectives"][str(d)] = {"construction": built, "hlo_check": {
            c["target"]: check(built, c["collectives"]) for c in compiled if c["devices"] == d}}
    result["hlo_check_note"] = HLO_CHECK_NOTE
    result["platforms"] = platform_table(flops_at, sizes, config)
    result["assumptions"] = assumptions(config, sizes)
    print_table(result)
    assert "tensorflow" not in sys.modules, "benchmarks must not import TensorFlow"
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
