"""Weights on disk, in and out: our Orbax checkpoints and run configs
(checkpoint), any source read by path with its architecture resolved
(pretrained: our workdirs and the official SimCLR TF2 checkpoints), and the
official TF2 formats (official_tf2 reads them, official_export writes a
SavedModel). Nothing here imports a protocol."""
