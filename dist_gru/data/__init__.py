"""Sequence data: synthetic tasks, the `dist_gru.seq/v1` file format, and sharded loading."""

from dist_gru.data.files import DataFormatError, SequenceFileDataset, write_features, write_sequences

__all__ = ["DataFormatError", "SequenceFileDataset", "write_features", "write_sequences"]
