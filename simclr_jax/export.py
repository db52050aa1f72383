"""Writes an encoder in another framework's format, from the command line.

    python -m simclr_jax.export --pretrained=PATH --out=DIR [--step=N]
    python -m simclr_jax.export --pretrained=PATH --format=torchvision --out=FILE.safetensors [--step=N]

PATH is any path ``simclr_jax.load_encoder`` reads (our pretraining or
fine-tuning workdir, an official SimCLR TF2 checkpoint, a torchvision
state_dict). ``--format=saved_model`` (the default) writes an official-format
TF2 SavedModel into DIR (weights/official_export.py says what it holds);
``--format=torchvision`` a torchvision ResNet state_dict as a safetensors file
(weights/torchvision.py; docs/pytorch.md shows how PyTorch loads it). A
mistake (an architecture the format cannot hold, an existing target) is one
message, without a traceback, before anything is read or written.
"""
import sys

from absl import app, flags

from simclr_jax.encoder import load_encoder
from simclr_jax.errors import UserError
from simclr_jax.weights import official_export, pretrained, torchvision

FORMATS = ("saved_model", "torchvision")
flags.DEFINE_string("pretrained", None, "our pretraining workdir, an official SimCLR TF2 checkpoint or a "
                    "torchvision state_dict (*.safetensors)")
flags.DEFINE_string("out", None, "what to write: the SavedModel directory (must not exist, or be empty), or the "
                    "*.safetensors file (must not exist)")
flags.DEFINE_enum("format", "saved_model", FORMATS, "saved_model: the official SimCLR TF2 format; torchvision: "
                  "a torchvision ResNet state_dict in safetensors")
flags.DEFINE_integer("step", None, "our checkpoint's step to export (default: the latest)")


def export(path: str, out: str, *, format: str, step=None) -> str:
    """Writes the encoder at ``path`` to ``out`` in ``format`` (see FORMATS)
    and returns what it says it wrote. For torchvision, the architecture and
    the target are checked before any weight is read."""
    if format == "torchvision":
        torchvision.check_exportable(pretrained.architecture(path).model)
        torchvision.check_target(out)
    encoder = load_encoder(path, step=step)
    if format == "saved_model":
        return f"wrote {official_export.export_saved_model(encoder, out)} from {encoder}"
    written = f"wrote {torchvision.export_torchvision(encoder, out)} from {encoder}"
    notes = [] if encoder.supervised_head is not None else [
        "it has no fc (no supervised head): set model.fc = torch.nn.Identity() before load_state_dict"]
    if not encoder.model.cifar_stem and encoder.model.stem_pool_padding == "same":
        notes.append("its stem max-pool pads as TensorFlow's SAME: set model.maxpool = nn.Sequential("
                     "nn.ZeroPad2d((0, 1, 0, 1)), nn.MaxPool2d(3, 2)) (docs/pytorch.md)")
    return "; ".join([written, *notes])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: pass --pretrained=PATH --out=DIR [--step=N]")
    try:
        print(export(flags.FLAGS.pretrained, flags.FLAGS.out, format=flags.FLAGS.format, step=flags.FLAGS.step))
    except UserError as e:
        print(f"simclr_jax.export: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["pretrained", "out"])
    app.run(main)
