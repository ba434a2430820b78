"""GRU sequence models (see ``dist_gru.model.model``)."""

from dist_gru.model.model import (
    GRUModel,
    SeedGRU,
    SeedGRUCell,
    reverse_within_lengths,
    seed_scan,
    verify_model_folder,
    write_checksums,
)

__all__ = [
    "GRUModel",
    "SeedGRU",
    "SeedGRUCell",
    "reverse_within_lengths",
    "seed_scan",
    "verify_model_folder",
    "write_checksums",
]
