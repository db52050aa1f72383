"""Per-device memory of the SimCLR train step: plain, remat, microbatches (GradCache), both.

    python benchmarks/memory.py                                # the backend present: a GPU's own figures
    python benchmarks/memory.py --target=tpu:v5p:1x1x1 --cache=/tmp/memory.json   # TPU, compiled here
    python benchmarks/memory.py --target=tpu:v5p:1x1x1 --models=resnet50_224,resnet18_cifar \
        --variants=plain,remat,K2,K4,K8,remat+K2,remat+K4,remat+K8 --cache=/tmp/memory.json  # the full table
    python benchmarks/memory.py --time_only                    # step time per image of each variant, here

Each variant of the step that pretraining runs
(simclr_jax.pretraining.step.make_train_step) is compiled, never run:
``jit(...).lower(state, batch).compile().memory_analysis()`` on abstract
inputs (jax.ShapeDtypeStruct with their shardings), so batches far larger
than this machine's memory cost nothing. Variants:

  plain        one forward/backward over the device's 2b views
  remat        the same, residual blocks rematerialised (models.SimCLR(remat=True))
  K<n>         microbatches=n: the chunked GradCache step (pretraining/chunked.py)
  remat+K<n>   both

Peak bytes of one device = argument + output - alias + temp: what XLA's
buffer assignment reserves for a step (the state is donated, so its outputs
alias its arguments). The executable's own code is reported beside it
(code_bytes; on TPU it lives in HBM too). The state is replicated and the step is data parallel, so a device's
memory depends on its own batch b; the only part that grows with the device
count D is NT-Xent's [2b, 2bD] logits, small next to the activations. One
device is therefore enough: ``--devices`` changes D.

Why a TPU target on a machine without one: XLA:CPU does not schedule for
memory, so its figures are not an accelerator's (ResNet-18 width 1/4, b=256:
465 MB plain, 498 MB remat; ResNet-50 b=32: 9.5 GiB on CPU, 3.1 GiB on TPU).
``--target=tpu:<topology>`` compiles ahead of time for abstract TPU devices
(jax.experimental.topologies, as MaxText's train_compile.py does) with the
real TPU compiler. It needs libtpu, the version jax[tpu] pins (jax 0.10.2:
libtpu 0.0.42.*), which is not a requirement of this project:
``pip install --no-deps "libtpu==0.0.42.*"``, or ``pip install --target DIR``
and TPU_LIBRARY_PATH=DIR/libtpu/libtpu.so (libtpu's warnings about the TPU
accelerator type and worker hostnames are harmless; a second process at once
needs ALLOW_MULTIPLE_LIBTPU_LOAD=1). Use one v5p chip, tpu:v5p:1x1x1: its
95.7 GiB of HBM holds both default budgets. The compiler rematerialises on
its own only above a chip's capacity and fails to compile what still does
not fit (counted as not fitting); on a 16 GiB v5e that would blur the 16 GiB
figures and leave no 80. TPU compiles take 1.5-10 min each on 2 cores (code
generation, not memory planning): keep --cache, which makes reruns and wider
searches reuse every compile. The cache keys hold the jax and libtpu
versions, not the code: use a new file after changing the step.

For each budget (GiB, 2^30 bytes, how HBM is quoted; the runtime reserves a
little of it), the largest per-device batch, a multiple of --multiple and of
K, that fits: memory is close to linear in b, so a line through the measured
points nearest the budget predicts it, and compiles at the predictions
narrow the bracket (largest_batch_bracket: ``fits`` was compiled and fits,
``does_not_fit`` was compiled and does not; ``settled`` once they are within
--tolerance) in at most --max_probes compiles per budget. batch_vs_plain,
the largest batch over plain's, needs both settled. Close to linear, not
exactly: at some batches the TPU compiler picks other layouts (ResNet-50
remat: 2808 -> 79.6 GiB, 2816 -> 88.1 GiB, 2896 -> 82.4 GiB), so a bracket
says what was compiled, not that every batch below ``fits`` fits.

--time measures the step on the local devices (ResNet-18 CIFAR, width 1/8,
float32, global batch 128) for every variant, in rounds that interleave the
variants so drifting load hits all of them alike; the median step time per
image and its ratio to plain are reported. Off by default for TPU targets
(it would time this machine's CPU, not the target).

Prints one JSON object (and a table on stderr). No TensorFlow is imported.
"""
import json
import math
import os
import statistics
import sys
import time

from absl import app, flags

# Lets `python benchmarks/memory.py` import the package from a checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from simclr_jax import models, optim, sharding  # noqa: E402
from simclr_jax.pretraining import step  # noqa: E402

MODELS = {  # name -> architecture and the per-device batches whose bytes are reported by default
    "resnet50_224": {"depth": 50, "cifar_stem": False, "image_size": 224, "batches": "64,128"},
    "resnet18_cifar": {"depth": 18, "cifar_stem": True, "image_size": 32, "batches": "512,1024"},
}
VARIANTS = ["plain", "remat", "K2", "K4", "K8", "remat+K2", "remat+K4", "remat+K8"]

flags.DEFINE_string("target", "local", "'local' (the backend present) or 'tpu:<topology>', e.g. tpu:v5p:1x1x1.")
# Defaults sized to ~15 min of XLA:CPU compiles on 2 cores (remat+K8 alone takes ~7 min a compile there).
flags.DEFINE_list("models", ["resnet50_224"], f"Models to measure, of {list(MODELS)}.")
flags.DEFINE_list("variants", ["plain", "remat", "remat+K4"], f"Of {VARIANTS} (any K<n>).")
for _name, _spec in MODELS.items():
    flags.DEFINE_list(f"{_name}_batches", _spec["batches"], f"Per-device batches whose bytes {_name} reports.")
flags.DEFINE_list("budgets_gb", ["16", "80"], "Per-device memory budgets in GiB for the largest batch.")
flags.DEFINE_integer("multiple", 8, "Largest batches are multiples of this (and of K).")
flags.DEFINE_integer("max_probes", 2, "At most this many compiles per budget to bracket the largest batch.")
flags.DEFINE_float("tolerance", 0.02, "The search stops when the bracket is within this fraction of the batch.")
flags.DEFINE_integer("devices", 1, "Devices in the data-parallel mesh (memory is per device).")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype (parameters stay float32).")
flags.DEFINE_string("cache", None, "JSON file of compiled memory figures, read and extended: reruns skip compiles.")
flags.DEFINE_bool("time", None, "Time each variant on the local devices (default: for --target=local only).")
flags.DEFINE_bool("time_only", False, "Only the timing part.")
flags.DEFINE_integer("time_rounds", 4, "Timing rounds; each runs every variant --time_steps steps.")
flags.DEFINE_integer("time_steps", 5, "Timed steps per variant per round (after 2 untimed ones).")
FLAGS = flags.FLAGS

GiB = 2**30


def parse_variant(variant: str) -> tuple[bool, int]:
    """'remat+K4' -> (remat=True, microbatches=4)."""
    remat, microbatches = False, 1
    for part in variant.split("+"):
        if part == "remat":
            remat = True
        elif part.startswith("K") and part[1:].isdigit():
            microbatches = int(part[1:])
        elif part != "plain":
            raise ValueError(f"unknown variant {variant!r}")
    return remat, microbatches


def target_devices(target: str, count: int) -> list:
    """The first ``count`` devices of the target: local ones, or compile-only TPU devices."""
    if target == "local":
        return jax.devices()[:count]
    platform, _, topology = target.partition(":")
    if platform != "tpu" or not topology:
        raise ValueError(f"--target must be 'local' or 'tpu:<topology>', got {target!r}")
    from jax.experimental import topologies
    # One chip per host: a 1x1 topology would not split into the default 2x2 hosts.
    devices = topologies.get_topology_desc(topology, "tpu", chips_per_host_bounds=(1, 1, 1)).devices
    if len(devices) < count:
        raise ValueError(f"{topology} has {len(devices)} devices, --devices={count}")
    return devices[:count]


def build(spec: dict, variant: str, dtype: str, mesh, width_multiplier: float = 1.0):
    """(model, optimiser, jitted train step) of one variant, as pretraining builds them."""
    remat, microbatches = parse_variant(variant)
    model = models.SimCLR(depth=spec["depth"], width_multiplier=width_multiplier, cifar_stem=spec["cifar_stem"],
                          axis_name=sharding.DATA_AXIS, dtype=jnp.dtype(dtype), remat=remat)
    tx = optim.lars(learning_rate=0.1, weight_decay=1e-6)
    train_step = step.make_train_step(model, tx, learning_rate=lambda s: 0.1, temperature=0.1, mesh=mesh,
                                      microbatches=microbatches)
    return model, tx, train_step


def compiled_memory(spec: dict, variant: str, batch: int, dtype: str, mesh) -> dict:
    """Memory figures of one device for per-device batch ``batch``, from compiling alone."""
    model, tx, train_step = build(spec, variant, dtype, mesh)
    size = spec["image_size"]
    # Shapes only: nothing is initialised or allocated, however large.
    shapes = jax.eval_shape(lambda: step.create_train_state(model, tx, image_size=size, seed=0, mesh=mesh))
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding.replicated(mesh)),
                         shapes)
    views = jax.ShapeDtypeStruct((batch * mesh.devices.size, 2, size, size, 3), jnp.float32,
                                 sharding=sharding.batch_sharded(mesh))
    start = time.perf_counter()
    try:
        stats = train_step.lower(state, {"views": views}).compile().memory_analysis()
    except jax.errors.JaxRuntimeError as e:  # TPU: does not fit the chip's HBM even rematerialised
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {"bytes": None, "error": str(e).splitlines()[0][:300]}
    return {
        "bytes": (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
                  + stats.temp_size_in_bytes),
        "temp_bytes": stats.temp_size_in_bytes,
        "argument_bytes": stats.argument_size_in_bytes,
        "code_bytes": stats.generated_code_size_in_bytes,
        "compile_seconds": round(time.perf_counter() - start, 1),
    }


class Memo:
    """compiled_memory, remembered in memory and (with --cache) in a JSON file:
    each TPU compile costs minutes, and a rerun or a wider search needs most
    of the same ones again. Keys hold everything the figures depend on."""

    def __init__(self, path: str | None, mesh):
        self.path, self.mesh = path, mesh
        self.entries = {}
        if path and os.path.exists(path):
            with open(path) as f:
                self.entries = json.load(f)
        device = mesh.devices.flat[0]
        self.prefix = [jax.__version__, device.client.platform_version, device.device_kind, mesh.devices.size]

    def key(self, spec: dict, variant: str, batch: int, dtype: str) -> str:
        return json.dumps(self.prefix + [{k: v for k, v in spec.items() if k != "batches"}, variant, batch, dtype])

    def known(self, spec: dict, variant: str, dtype: str) -> dict:
        """{batch: result} of every cached compile of this variant."""
        batches = {key: json.loads(key)[-2] for key in self.entries}
        return {b: self.entries[key] for key, b in batches.items() if key == self.key(spec, variant, b, dtype)}

    def __call__(self, spec: dict, variant: str, batch: int, dtype: str) -> dict:
        key = self.key(spec, variant, batch, dtype)
        if key not in self.entries:
            result = compiled_memory(spec, variant, batch, dtype, self.mesh)
            print(f"  {variant:>9} b={batch:<6} {fmt(result['bytes'])} "
                  f"({result.get('compile_seconds', '-')} s)", file=sys.stderr, flush=True)
            self.entries[key] = result
            if self.path:
                with open(self.path + ".tmp", "w") as f:
                    json.dump(self.entries, f)
                os.replace(self.path + ".tmp", self.path)
        return self.entries[key]


def fits(result: dict, budget: float) -> bool:
    return result["bytes"] is not None and result["bytes"] <= budget


def line_guess(points: dict, budget: float, multiple: int) -> int | None:
    """Largest multiple of ``multiple`` under ``budget`` on the line through
    the two measured points nearest the budget (bytes = a + c * b)."""
    measured = sorted(points.items(), key=lambda p: abs(p[1]["bytes"] - budget) if p[1]["bytes"] else math.inf)
    measured = [(b, r["bytes"]) for b, r in measured if r["bytes"] is not None][:2]
    if len(measured) < 2 or measured[0][0] == measured[1][0]:
        return None
    (b0, y0), (b1, y1) = measured
    slope = (y1 - y0) / (b1 - b0)
    if slope <= 0:
        return None
    return int((b0 + (budget - y0) / slope) // multiple * multiple)


def largest_batch(measure, points: dict, budget: float, multiple: int, tolerance: float, max_probes: int) -> dict:
    """The largest per-device batch (a multiple of ``multiple``) whose peak
    fits ``budget``, bracketed by compiles: ``fits`` is the largest batch
    compiled that fits, ``does_not_fit`` the smallest that does not (None:
    none yet). Each probe is the line's prediction inside the bracket; the
    search stops once the bracket is within ``tolerance`` of the batch (or a
    single multiple), or after ``max_probes`` compiles. ``points`` ({batch:
    result}, grown in place) holds every compile so far."""
    for probe in range(max_probes + 1):
        hi = min((b for b, r in points.items() if not fits(r, budget)), default=math.inf)
        lo = max((b for b, r in points.items() if fits(r, budget) and b < hi), default=0)
        if hi - lo <= max(multiple, tolerance * lo) or probe == max_probes:
            break
        guess = line_guess(points, budget, multiple)
        if guess is None:  # no line yet: double, or halve the bracket
            guess = 2 * lo if hi == math.inf else (lo + hi) // 2 // multiple * multiple
        guess = max(lo + multiple, guess if hi == math.inf else min(guess, hi - multiple))
        points[guess] = measure(guess)
    return {"fits": lo, "does_not_fit": None if hi == math.inf else hi,
            "settled": hi - lo <= max(multiple, tolerance * lo)}


def fmt(nbytes) -> str:
    return "  over HBM" if nbytes is None else f"{nbytes / GiB:7.2f} GiB"


def memory_table(target: str) -> dict:
    mesh = sharding.make_mesh(target_devices(target, FLAGS.devices))
    memo = Memo(FLAGS.cache, mesh)
    budgets = {b: float(b) * GiB for b in FLAGS.budgets_gb}
    out = {"target": target, "device_kind": mesh.devices.flat[0].device_kind, "devices": mesh.devices.size,
           "dtype": FLAGS.dtype, "budget_unit": "GiB", "models": {}}
    for name in FLAGS.models:
        spec = MODELS[name]
        print(f"{name}:", file=sys.stderr, flush=True)
        variants = {}
        for variant in FLAGS.variants:
            multiple = math.lcm(FLAGS.multiple, parse_variant(variant)[1])
            measure = lambda b, spec=spec, variant=variant: memo(spec, variant, b, FLAGS.dtype)
            points = memo.known(spec, variant, FLAGS.dtype)  # every compile cached so far helps
            points.update({int(b): measure(int(b)) for b in getattr(FLAGS, f"{name}_batches")})
            largest = {key: largest_batch(measure, points, budget, multiple, FLAGS.tolerance, FLAGS.max_probes)
                       for key, budget in budgets.items()}
            variants[variant] = {
                "bytes_at": {str(b): points[b]["bytes"] for b in sorted(points)},
                "code_bytes_at": {str(b): points[b].get("code_bytes") for b in sorted(points)},
                "largest_batch": {k: v["fits"] for k, v in largest.items()},
                "largest_batch_bracket": largest,
            }
        plain = variants.get("plain", {}).get("largest_batch_bracket", {})
        for v in variants.values():  # the yardstick: batch in the same memory as plain's
            v["batch_vs_plain"] = {k: round(s["fits"] / plain[k]["fits"], 2)
                                   if s["settled"] and plain.get(k, {}).get("settled") and plain[k]["fits"] else None
                                   for k, s in v["largest_batch_bracket"].items()}
        out["models"][name] = {"spec": {k: v for k, v in spec.items() if k != "batches"}, "variants": variants}
    return out


def print_table(result: dict) -> None:
    for name, model in result["models"].items():
        shown = [int(b) for b in getattr(FLAGS, f"{name}_batches")]
        head = "".join(f"{'b=' + str(b):>11}" for b in shown)
        budgets = "".join(f"{'max b @' + k + ' GiB':>23}" for k in FLAGS.budgets_gb)
        print(f"\n{name} on {result['device_kind']} ({result['dtype']}), GiB per device\n"
              f"{'variant':>10}{head}{budgets}", file=sys.stderr)
        for variant, v in model["variants"].items():
            row = "".join(f"{fmt(v['bytes_at'].get(str(b))):>11}" for b in shown)
            for key, search in v["largest_batch_bracket"].items():
                ratio = v["batch_vs_plain"][key]
                row += f"{bracket(search):>15}{f'({ratio}x)' if ratio else '':>8}"
            print(f"{variant:>10}{row}", file=sys.stderr)
    print("(a..b: a fits, b does not, between them not compiled; Nx: a / plain's a)", file=sys.stderr)


def bracket(search: dict) -> str:
    hi = search["does_not_fit"]
    return f"{search['fits']}..{'?' if hi is None else hi}"


def time_variants(variants: list, rounds: int, steps: int, batch_size: int = 128) -> dict:
    """Median step time per image of each variant on the local devices, the
    variants interleaved round by round so that load drifting over the run
    (this machine is shared) weighs on all of them alike."""
    spec = {"depth": 18, "cifar_stem": True, "image_size": 32}
    mesh = sharding.make_mesh()
    sharding.check_batch_size(batch_size, mesh.devices.size, jax.process_count())
    views = np.random.default_rng(0).uniform(size=(batch_size, 2, 32, 32, 3)).astype(np.float32)
    batch = sharding.put_batch({"views": views}, mesh)
    runs = {}
    for variant in variants:
        model, tx, train_step = build(spec, variant, "float32", mesh, width_multiplier=0.125)
        state = step.create_train_state(model, tx, image_size=spec["image_size"], seed=0, mesh=mesh)
        compiled = train_step.lower(state, batch).compile()
        for _ in range(2):  # warm-up
            state, metrics = compiled(state, batch)
        jax.block_until_ready(state)
        runs[variant] = {"compiled": compiled, "state": state, "times": []}
    for _ in range(rounds):
        for run in runs.values():
            for _ in range(steps):
                start = time.perf_counter()
                run["state"], metrics = run["compiled"](run["state"], batch)
                jax.block_until_ready(metrics)
                run["times"].append(time.perf_counter() - start)
    ms = {v: statistics.median(r["times"]) / batch_size * 1e3 for v, r in runs.items()}
    base = ms.get("plain")
    return {"model": "resnet18_cifar width 0.125", "dtype": "float32", "global_batch": batch_size,
            "devices": mesh.devices.size, "device_kind": jax.devices()[0].device_kind, "steps": rounds * steps,
            "ms_per_image": ms, "vs_plain": {v: round(t / base, 3) for v, t in ms.items()} if base else None}


def main(argv):
    del argv
    if FLAGS.target != "local":
        # Compile-only TPU devices come from the plugin; keep the TPU runtime
        # itself (and its search for a chip) out of the local backend.
        jax.config.update("jax_platforms", "cpu")
    result = {}
    if not FLAGS.time_only:
        result = memory_table(FLAGS.target)
        print_table(result)
        if result["device_kind"].lower().startswith("cpu"):
            result["warning"] = ("XLA:CPU does not schedule for memory: these figures do not show what remat "
                                 "saves on an accelerator. Use a GPU, or --target=tpu:<topology>.")
            print("WARNING: " + result["warning"], file=sys.stderr)
    if FLAGS.time_only or (FLAGS.target == "local" if FLAGS.time is None else FLAGS.time):
        result["time"] = time_variants(FLAGS.variants, FLAGS.time_rounds, FLAGS.time_steps)
        print(json.dumps(result["time"]["vs_plain"]), file=sys.stderr)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
