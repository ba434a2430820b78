"""Where a training step's micro-batches come from: one Source per data kind, one interface.

- `SampleSource`: sequences or windows (synthetic, `seq/v1` folders, windows of either), drawn in
  global batches by `TrainBatchSampler` through a DataLoader; every sample starts from a zero state.
- `StreamSource`: stream mode (`train.tbptt`): every lane reads the next chunk of its stream
  (`StreamSampler`), and the hidden state is carried from chunk to chunk (truncated BPTT). That
  state is the one piece of training state that is not a function of the step: the source saves
  and restores it as a `Stateful` of the checkpointer, under the name "lanes".

What the trainer asks of a source, and nothing more (no branch on the kind in the loop):
`batches(start_step)` the endless (epoch, micro-batch) stream from an optimizer step on;
`epoch_at(step)`; `valid_steps(step)` the valid time steps of a step's whole global batch, a pure
function of the step (the denominator of a per-step mean loss, known without a collective);
`carried(batch)` the state a micro-batch starts from (None: zeros) and `keep(state)` the state after
it; `restart_nonfinite()` after a skipped non-finite step; `eval_batches(model, accelerator)` the
validation data as the one evaluator (`dist_gru.infer.evaluate`) reads it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch

from dist_gru.config import Config, micro_batch_size
from dist_gru.data.loading import (
    SampleEvalBatches,
    TrainBatchSampler,
    build_dataset,
    loader_workers,
    make_loader,
    train_stream,
)
from dist_gru.data.statics import aligned_statics
from dist_gru.data.streams import (
    LaneState,
    StreamEvalBatches,
    StreamSampler,
    build_stream_dataset,
    lane_stream,
)


class Source(Protocol):
    train_set: Any
    val_set: Any | None

    def prepare(self, device: torch.device) -> None: ...
    def batches(self, start_step: int) -> Iterator[tuple[int, dict]]: ...
    def epoch_at(self, step: int) -> int: ...
    def valid_steps(self, step: int) -> int: ...
    def carried(self, batch: dict) -> torch.Tensor | None: ...
    def keep(self, state: torch.Tensor | None) -> None: ...
    def restart_nonfinite(self) -> None: ...
    def eval_batches(self, model: torch.nn.Module, accelerator: Any) -> EvalBatches: ...


class EvalBatches(Protocol):
    """What the evaluator (`dist_gru.infer.evaluate.evaluate`) reads: batches, and the state each
    starts from (None: zeros) and ends with."""

    def __iter__(self) -> Iterator[dict]: ...
    def carried(self, batch: dict) -> torch.Tensor | None: ...
    def keep(self, state: torch.Tensor | None) -> None: ...


def evaluation_batches(
    cfg: Config, dataset: Any, model: Any, accelerator: Any, batch_size: int, num_workers: int = 0
) -> EvalBatches:
    """The evaluator's batches of `dataset` on this rank: streams chunk by chunk with their state
    carried (`train.tbptt`), every sample once otherwise."""
    rank, world_size = accelerator.process_index, accelerator.num_processes
    if cfg.train.tbptt:
        lanes, chunk = cfg.train.global_batch_size, cfg.train.tbptt
        return StreamEvalBatches(dataset, lanes, chunk, rank, world_size, model.initial_state)
    return SampleEvalBatches(dataset, batch_size, rank, world_size, num_workers)


def build_source(cfg: Config, rank: int, world_size: int, device: torch.device) -> Source:
    """The job's source: streams with `train.tbptt`, samples otherwise."""
    if cfg.train.tbptt:
        return StreamSource(cfg, rank, world_size, device)
    return SampleSource(cfg, rank, world_size)


class SampleSource:
    """Sequences or windows in global batches (the sampling contract of `TrainBatchSampler`)."""

    def __init__(self, cfg: Config, rank: int, world_size: int):
        self.cfg = cfg
        self.train_set = build_dataset(cfg.data, "train", head=cfg.model.head)
        self.val_set = build_dataset(cfg.data, "val", head=cfg.model.head)
        train_statics = getattr(self.train_set, "statics", None)
        if self.val_set is not None and train_statics is not None:  # codes as the training vocabularies have them
            where = cfg.data.val_path if cfg.data.name == "files" else f"data.name={cfg.data.name}"
            self.val_set.statics = aligned_statics(self.val_set.statics, train_statics.columns, where)
        self.sampler = TrainBatchSampler(
            self.train_set.lengths,
            micro_batch_size(cfg),
            cfg.train.grad_accum_steps,
            rank,
            world_size,
            cfg.train.seed,
            bucket_by_length=cfg.data.bucket_by_length,
        )
        self.loader = None

    def prepare(self, device: torch.device) -> None:
        """The DataLoader, once the device is known (its workers and pinned memory depend on it)."""
        workers = loader_workers(self.cfg.data, device)
        self.loader = make_loader(self.train_set, self.sampler, workers, pin_memory=device.type == "cuda")

    def batches(self, start_step: int) -> Iterator[tuple[int, dict]]:
        return train_stream(self.loader, self.sampler, start_step)

    def epoch_at(self, step: int) -> int:
        return self.sampler.position(step)[0]

    def valid_steps(self, step: int) -> int:
        return self.sampler.valid_steps(step)

    def carried(self, batch: dict) -> None:
        return None

    def keep(self, state: torch.Tensor | None) -> None:
        pass  # every sample starts from zeros

    def restart_nonfinite(self) -> None:
        pass  # no state outlives a step

    def eval_batches(self, model: torch.nn.Module, accelerator: Any) -> SampleEvalBatches:
        workers = loader_workers(self.cfg.data, accelerator.device)
        return evaluation_batches(self.cfg, self.val_set, model, accelerator, self.cfg.train.eval_batch_size, workers)


class StreamSource:
    """This rank's lanes of the training streams, their carried state, and its checkpoint form."""

    def __init__(self, cfg: Config, rank: int, world_size: int, device: torch.device):
        self.cfg = cfg
        self.train_set = build_stream_dataset(cfg, "train")
        self.val_set = build_stream_dataset(cfg, "val")
        lanes, chunk = cfg.train.global_batch_size, cfg.train.tbptt
        self.sampler = StreamSampler(self.train_set.lengths, lanes, chunk, rank, world_size, cfg.train.seed)
        self.lanes = LaneState(cfg.model.num_layers, self.sampler.per_rank, cfg.model.hidden_size, device)
        self.next_step = 0  # the optimizer step whose chunks come next: what a checkpoint records

    def prepare(self, device: torch.device) -> None:
        pass  # chunks are read step by step in `batches`

    def batches(self, start_step: int) -> Iterator[tuple[int, dict]]:
        for taken, (epoch, batch) in enumerate(lane_stream(self.train_set, self.sampler, start_step), 1):
            self.next_step = start_step + taken
            yield epoch, batch

    def epoch_at(self, step: int) -> int:
        return self.sampler.position(step)[0]

    def valid_steps(self, step: int) -> int:
        return self.sampler.valid_steps(step)

    def carried(self, batch: dict) -> torch.Tensor:
        return self.lanes.carried(batch["reset"])

    def keep(self, state: torch.Tensor | None) -> None:
        self.lanes.keep(state)

    def restart_nonfinite(self) -> None:
        """A lane whose carried state is not finite would carry it into every later chunk of its
        stream; it starts again from zero, as at the start of a stream."""
        h = self.lanes.h
        bad = ~torch.isfinite(h).all(dim=2).all(dim=0)  # [lanes] of this rank
        h[:, bad] = 0.0

    def eval_batches(self, model: torch.nn.Module, accelerator: Any) -> StreamEvalBatches:
        return evaluation_batches(self.cfg, self.val_set, model, accelerator, self.cfg.train.eval_batch_size)

    # --- Stateful: the lanes' positions (state.json) and their carried state (a tensor file) ----

    def positions(self, step: int) -> list[list[int]]:
        """[stream, offset] of every lane's chunk at `step`."""
        where = self.sampler.chunks(step)
        return [[int(i), int(o)] for i, o in zip(where["stream"], where["offset"], strict=True)]

    def state_dict(self) -> dict[str, Any]:
        return {"tbptt": self.cfg.train.tbptt, "positions": self.positions(self.next_step)}

    def gather(self, accelerator: Any) -> torch.Tensor:
        """Every lane's state [B, num_layers, H] in global lane order. All ranks participate."""
        return self.lanes.gather(accelerator)

    def load_state_dict(self, state: dict[str, Any] | None, step: int, every_lane: torch.Tensor) -> None:
        """This rank's lanes out of a checkpoint of `step` (saved on any world size); its positions
        must be where this job's sampler puts the lanes at that step."""
        if (state or {}).get("positions") != self.positions(step):
            raise ValueError(
                f"its lanes stand at other stream positions than this job's at step {step} "
                "(were the training streams changed?)"
            )
        self.lanes.load(every_lane, self.sampler.rank_lanes)
        self.next_step = step

