"""The hand-written loop `dist-gru bench --compare-bare` measures ours against.

    python -m dist_gru.bench.bare_loop '{"seq_len": 100, "num_features": 32, "global_batch": 64, ...}'

What a user writes with plain PyTorch and nothing of dist_gru: `nn.GRU` + `nn.Linear` on the last
step, an in-memory TensorDataset through a DataLoader (DistributedSampler + DDP when there are
several ranks), the job's optimizer, learning rate and clipping. The bench starts it as a fresh
process per rank, with its own process group, so that it inherits nothing of our process either:
no allocator settings (`train.keep_freed_memory` is process-wide), no thread pools, no warmed-up
caches. This module imports nothing else of the package. Prints one JSON line: this rank's
samples/s over the timed steps, and which dist_gru modules the process had loaded.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

# The reference data: at most this many sequences, within this many bytes of features.
REFERENCE_SAMPLES, REFERENCE_BYTES = 8192, 256 << 20


def reference_tensors(
    seq_len: int, num_features: int, global_batch: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference workload's data: noise sequences [seq_len, num_features], target 0.1 x the sum
    of feature 0; up to 8192 of them within 256 MiB, at least two global batches. The same tensors
    feed the bare loop (in memory) and ours (written once as a dataset folder)."""
    count = max(2 * global_batch, min(REFERENCE_SAMPLES, REFERENCE_BYTES // (4 * seq_len * num_features)))
    x = torch.randn(count, seq_len, num_features, generator=torch.Generator().manual_seed(seed))
    return x, x[:, :, 0].sum(dim=1, keepdim=True) * 0.1


@dataclass(frozen=True)
class BareSpec:
    """Everything the bare loop needs, as plain values (it crosses a process boundary as JSON)."""

    seq_len: int
    num_features: int
    global_batch: int
    seed: int
    hidden_size: int
    num_layers: int
    optimizer: str  # adam | adamw
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    grad_clip: float
    bf16: bool
    steps: int
    warmup: int
    threads: int
    device: str  # cpu | cuda:N
    rank: int = 0
    world_size: int = 1
    init_method: str | None = None  # tcp://host:port of this loop's own process group

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class BareRegressor(torch.nn.Module):
    """`nn.GRU` + `nn.Linear` on the last step."""

    def __init__(self, num_features: int, hidden_size: int, num_layers: int):
        super().__init__()
        self.gru = torch.nn.GRU(num_features, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = torch.nn.Linear(hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.head(out[:, -1])


def train(spec: BareSpec) -> float:
    """Trains `spec.warmup + spec.steps` optimizer steps; returns this rank's samples/s over the timed ones."""
    torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if spec.world_size > 1:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=spec.init_method,
            rank=spec.rank,
            world_size=spec.world_size,
            timeout=timedelta(minutes=5),
        )
    per_rank = spec.global_batch // spec.world_size
    generator = torch.Generator().manual_seed(spec.seed)
    dataset = TensorDataset(*reference_tensors(spec.seq_len, spec.num_features, spec.global_batch, spec.seed))
    sampler = DistributedSampler(dataset, seed=spec.seed) if spec.world_size > 1 else None
    loader = DataLoader(
        dataset,
        batch_size=per_rank,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=True,
        generator=generator if sampler is None else None,
    )
    torch.manual_seed(spec.seed)
    model = BareRegressor(spec.num_features, spec.hidden_size, spec.num_layers).to(device)
    if spec.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer_class = torch.optim.Adam if spec.optimizer == "adam" else torch.optim.AdamW
    optimizer = optimizer_class(model.parameters(), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
    step, epoch, start = 0, 0, 0.0
    while step < spec.warmup + spec.steps:
        if sampler is not None:
            sampler.set_epoch(epoch)
        for xb, yb in loader:
            if step == spec.warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.bf16):
                out = model(xb.to(device, non_blocking=True))
            loss = F.mse_loss(out.float(), yb.to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if spec.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            optimizer.step()
            step += 1
            if step == spec.warmup + spec.steps:
                break
        epoch += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    samples_per_s = per_rank * spec.steps / (time.perf_counter() - start)
    if dist.is_initialized():
        dist.destroy_process_group()
    return samples_per_s


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m dist_gru.bench.bare_loop '<BareSpec as JSON>'", file=sys.stderr)
        return 2
    fields = json.loads(argv[0])
    spec = BareSpec(**{**fields, "betas": tuple(fields["betas"])})
    samples_per_s = train(spec)
    loaded = sorted(name for name in sys.modules if name.split(".")[0] == "dist_gru")
    print(json.dumps({"samples_per_s": samples_per_s, "dist_gru_modules": loaded}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
