"""The shared ground: errors, files on disk, progress bars, the batch, and how a model is sharded."""
