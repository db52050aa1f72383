"""Writes an encoder in another framework's format, from the command line.

    python -m simclr_jax.export --pretrained=PATH --out=DIR [--step=N]

PATH is any path ``simclr_jax.load_encoder`` reads (our pretraining or
fine-tuning workdir, or an official SimCLR TF2 checkpoint); DIR receives an
official-format TF2 SavedModel (weights/official_export.py says what it holds).
"""
from absl import app, flags

from simclr_jax.encoder import load_encoder
from simclr_jax.weights.official_export import export_saved_model

flags.DEFINE_string("pretrained", None, "our pretraining workdir, or an official SimCLR TF2 checkpoint")
flags.DEFINE_string("out", None, "the SavedModel directory to write (must not exist, or be empty)")
flags.DEFINE_integer("step", None, "our checkpoint's step to export (default: the latest)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: pass --pretrained=PATH --out=DIR [--step=N]")
    encoder = load_encoder(flags.FLAGS.pretrained, step=flags.FLAGS.step)
    print(f"wrote {export_saved_model(encoder, flags.FLAGS.out)} from {encoder}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["pretrained", "out"])
    app.run(main)
