"""GRU sequence models: ``GRUModel`` = scaler + encoder + head (see ``dist_gru.model.model``)."""

from dist_gru.model.encoder import Encoder
from dist_gru.model.heads import ForecastHead, LastHead, StepHead, build_head, build_layout
from dist_gru.model.model import GRUModel, verify_model_folder, write_checksums
from dist_gru.model.scaler import Affine, Scaler, TokenScaler
from dist_gru.model.seed import SeedGRU, SeedGRUCell, reverse_within_lengths, seed_scan

__all__ = [
    "Affine",
    "Encoder",
    "ForecastHead",
    "GRUModel",
    "LastHead",
    "Scaler",
    "SeedGRU",
    "SeedGRUCell",
    "StepHead",
    "TokenScaler",
    "build_head",
    "build_layout",
    "reverse_within_lengths",
    "seed_scan",
    "verify_model_folder",
    "write_checksums",
]
