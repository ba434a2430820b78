"""dist-gru: train GRU sequence models on a laptop, a GPU, a multi-GPU node or a SLURM cluster."""

__version__ = "0.1.0"
