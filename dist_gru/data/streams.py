"""Long streams for stateful training (truncated BPTT): lanes walk through streams chunk by chunk.

    dist-gru prepare --text corpus.txt --out data/bytes --val-fraction 0.1
    dist-gru train --config configs/bytes.yaml          # train.tbptt=128, data.targets=next

Every stored sequence of a `dist_gru.seq/v1` folder is a stream. With `train.tbptt: T` a stream
is cut into chunks of T steps (its last chunk may be shorter), and the global batch is
`train.global_batch_size` = B parallel *lanes*. The sample of optimizer step s for lane b is a
pure function of (seed, s) and the stream lengths, like every other kind of sample:

- epoch e orders the streams by a permutation seeded by (seed, e) and lays their chunks end to
  end on one tape of C chunks; lane b owns tape chunks [b K, (b + 1) K), K = C // B, and at step
  k of the epoch it reads chunk b K + k (the last C - B K chunks of an epoch are dropped, as the
  last incomplete global batch is in the other modes: fewer than B chunks);
- a lane's hidden state is carried from one chunk to the next (detached after each optimizer
  step) and reset to zero where the lane's chunk starts a stream or the lane starts its share
  of an epoch (`reset`); for a single long stream this is the classic "B columns" layout;
- rank r of W owns lanes [r B / W, (r + 1) B / W): every rank knows every lane's chunk, so the
  loss of a step averages over the valid steps of all lanes without a collective.

The carried state is training state that is *not* a function of the step: the trainer gathers
every lane's state into the checkpoint, indexed by global lane, so a run resumes on any world
size that divides B (`LaneState`).

Targets: `data.targets: dataset` uses the stored per-step targets; `next` trains every step to
predict the next step's features (regression) or token (classification over the vocabulary), so a
stream of L steps has L - 1 trained steps. Token streams hold integer ids (`feature_dtype` uint8 or
int32, see dist_gru.data.files); `write_token_stream` writes one, `dist-gru prepare --text` from a
text file as bytes (vocabulary 256).

`StreamEvalBatches` gives the evaluator validation streams the same way, every step counted once, per-step
metrics reduced exactly across ranks; for token streams it adds bits per token and the unigram
baseline (the entropy of the evaluated tokens' own frequencies).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_gru.config import Config
from dist_gru.data.files import (
    FEATURES_FILE,
    FORMAT,
    OFFSETS_FILE,
    DataFormatError,
    SequenceFileDataset,
    check_destination,
    package_version,
    staged_dataset,
)

BYTE_VOCAB = 256


# ----------------------------------------------------------------------------------- writing


def write_token_stream(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int) -> Path:
    """Write integer token ids ``tokens`` [S] as a one-stream `dist_gru.seq/v1` token dataset at
    ``path`` (uint8 if the vocabulary fits in a byte, else int32), atomically like `write_sequences`."""
    path = Path(path)
    tokens = np.asarray(tokens).reshape(-1)
    if tokens.dtype.kind not in "iu":
        raise DataFormatError(f"writing {path}: token ids have dtype {tokens.dtype}; expected integers")
    if len(tokens) < 2:
        raise DataFormatError(f"writing {path}: {len(tokens)} tokens; a stream to train on needs at least 2")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        bad = int(tokens[(tokens < 0) | (tokens >= vocab_size)][0])
        raise DataFormatError(f"writing {path}: token id {bad} outside the vocabulary [0, {vocab_size})")
    dtype = np.uint8 if vocab_size <= 256 else np.int32
    check_destination(path)
    meta = {
        "format": FORMAT,
        "num_sequences": 1,
        "num_features": 1,
        "task": "classification",
        "num_classes": int(vocab_size),
        "vocab_size": int(vocab_size),
        "target_kind": "none",
        "feature_dtype": np.dtype(dtype).name,
        "total_steps": len(tokens),
        "min_length": len(tokens),
        "max_length": len(tokens),
        "created_by": f"dist_gru {package_version()}",
    }
    with staged_dataset(path, meta) as staging:
        np.save(staging / FEATURES_FILE, tokens.astype(dtype).reshape(-1, 1))
        np.save(staging / OFFSETS_FILE, np.array([0, len(tokens)], dtype=np.int64))
    return path


def prepare_text(text_file: Path, out: Path, val_fraction: float | None) -> dict:
    """`dist-gru prepare --text`: the file's bytes as a token stream (vocabulary 256); with
    ``val_fraction`` f, ``out/train`` is the first 1 - f of the bytes and ``out/val`` the rest."""
    try:
        data = np.fromfile(text_file, dtype=np.uint8)
    except OSError as exc:
        raise DataFormatError(f"--text {text_file}: cannot read the file ({exc.strerror})") from None
    if val_fraction is None:
        write_token_stream(out, data, BYTE_VOCAB)
        return {"out": str(out), "tokens": len(data), "vocab_size": BYTE_VOCAB}
    if not 0 < val_fraction < 1:
        raise DataFormatError(f"--val-fraction {val_fraction}: expected a fraction strictly between 0 and 1")
    cut = len(data) - int(round(len(data) * val_fraction))
    if cut < 2 or len(data) - cut < 2:
        raise DataFormatError(
            f"--text {text_file}: {len(data)} bytes split at --val-fraction {val_fraction} leaves a split of fewer "
            "than 2 bytes; use a longer text or another fraction"
        )
    check_destination(out / "train")
    check_destination(out / "val")
    write_token_stream(out / "train", data[:cut], BYTE_VOCAB)
    write_token_stream(out / "val", data[cut:], BYTE_VOCAB)
    return {"out": str(out), "train_tokens": int(cut), "val_tokens": int(len(data) - cut), "vocab_size": BYTE_VOCAB}


# ----------------------------------------------------------------------------------- datasets


class StreamDataset:
    """The streams of a `SequenceFileDataset` as chunks with targets (`data.targets`).

    ``lengths`` are the trainable steps of each stream (one fewer than stored for ``next``), what
    the sampler cuts into chunks. ``read(stream, offset, length, chunk)`` returns one padded batch:
    ``x`` float32 [B, chunk, F] or int64 [B, chunk] token ids, ``y`` per step, ``lengths`` [B],
    ``index`` [B] (the chunk's first row in the stored file, for sample audits)."""

    def __init__(self, source: SequenceFileDataset, targets: str):
        self.source, self.targets = source, targets
        where = source.path
        if targets == "dataset" and source.target_kind != "step":
            raise DataFormatError(
                f"{where}: has {'no stored' if source.target_kind == 'none' else 'one target per sequence, not'} "
                "per-step targets, which data.targets=dataset trains on; use data.targets=next (predict the next "
                "step) or data with per-step targets"
            )
        self.vocab_size = source.vocab_size
        shift = 1 if targets == "next" else 0
        self.lengths = np.maximum(np.asarray(source.lengths, dtype=np.int64) - shift, 0)
        if self.lengths.sum() == 0:
            raise DataFormatError(f"{where}: every stream has a single step; next-step targets need at least 2")
        if targets == "next":
            tokens = self.vocab_size is not None
            self.task = "classification" if tokens else "regression"
            self.output_size = self.vocab_size if tokens else source.num_features
            self.num_classes = self.vocab_size if tokens else None
        else:
            self.task, self.output_size, self.num_classes = source.task, source.output_size, source.num_classes
        self.num_features = source.num_features
        self.target_kind = "step"
        self.path = source.path

    def __len__(self) -> int:
        return len(self.lengths)

    def read(self, stream: np.ndarray, offset: np.ndarray, length: np.ndarray, chunk: int) -> dict:
        source, shift = self.source, 1 if self.targets == "next" else 0
        count = len(stream)
        tokens = self.vocab_size is not None
        x = np.zeros((count, chunk) if tokens else (count, chunk, source.num_features), dtype=np.int64 if tokens else np.float32)
        if self.targets == "next":
            y = np.zeros((count, chunk) if tokens else (count, chunk, source.num_features), dtype=x.dtype)
        else:
            y_shape = (count, chunk) if source.task == "classification" else (count, chunk, source.output_size)
            y = np.zeros(y_shape, dtype=np.int64 if source.task == "classification" else np.float32)
        first = np.zeros(count, dtype=np.int64)
        for row, (i, start, steps) in enumerate(zip(stream.tolist(), offset.tolist(), length.tolist(), strict=True)):
            features, stored = source.read_span(i, start, start + steps + shift)
            x[row, :steps] = features[:steps, 0] if tokens else features[:steps]
            if self.targets == "next":
                y[row, :steps] = features[1 : steps + 1, 0] if tokens else features[1 : steps + 1]
            else:
                y[row, :steps] = stored[:steps]
            first[row] = int(source.offsets[i]) + start
        source.release_pages()
        return {
            "x": torch.from_numpy(x),
            "y": torch.from_numpy(y),
            "lengths": torch.from_numpy(length.astype(np.int64)),
            "index": torch.from_numpy(first),
        }


def build_stream_dataset(cfg: Config, split: str) -> StreamDataset | None:
    """The `train` or `val` streams of a stream-mode job (None: no val_path). Whether the model's
    vocabulary covers their token ids is a rule of `Task.check_fits` (`dist_gru.tasks`)."""
    data = cfg.data
    path = data.train_path if split == "train" else data.val_path
    if not path:
        return None
    return StreamDataset(SequenceFileDataset(path), data.targets)


def max_token(source: SequenceFileDataset) -> int:
    """The largest token id of a token stream (one chunked pass)."""
    total = int(source.meta["total_steps"])
    return int(max(int(rows.max()) for rows, _ in source.step_blocks(0, total, 1 << 22)))


# ----------------------------------------------------------------------------------- sampling


def chunks_per_stream(lengths: np.ndarray, chunk: int) -> np.ndarray:
    """int64 [streams]: the chunks of `chunk` steps each stream splits into (its last may be shorter)."""
    return -(-np.asarray(lengths, dtype=np.int64) // chunk)


class StreamSampler:
    """Which chunk every lane reads at each optimizer step (see the module docstring)."""

    def __init__(self, lengths: np.ndarray, lanes: int, chunk: int, rank: int, world_size: int, seed: int):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.lanes, self.chunk, self.seed = lanes, chunk, seed
        self.counts = chunks_per_stream(self.lengths, chunk)
        self.total_chunks = int(self.counts.sum())
        self.steps_per_epoch = self.total_chunks // lanes  # 0: Task.check_fits refuses the job
        self.per_rank = lanes // world_size
        self.rank_lanes = np.arange(rank * self.per_rank, (rank + 1) * self.per_rank)
        self._layout: tuple[int, np.ndarray, np.ndarray] | None = None

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of optimizer step `step`."""
        return divmod(step, self.steps_per_epoch)

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._layout is None or self._layout[0] != epoch:
            order = np.random.default_rng((self.seed, epoch)).permutation(len(self.lengths))
            first = np.zeros(len(order) + 1, dtype=np.int64)
            np.cumsum(self.counts[order], out=first[1:])
            self._layout = (epoch, order, first)
        return self._layout[1], self._layout[2]

    def chunks(self, step: int, lanes: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """(stream, offset, length, reset) of each lane in `lanes` (default: all B) at step `step`."""
        lanes = np.arange(self.lanes) if lanes is None else np.asarray(lanes)
        epoch, k = self.position(step)
        order, first = self._epoch_layout(epoch)
        tape = lanes * self.steps_per_epoch + k
        slot = np.searchsorted(first, tape, side="right") - 1
        stream = order[slot]
        offset = (tape - first[slot]) * self.chunk
        length = np.minimum(self.chunk, self.lengths[stream] - offset)
        reset = (offset == 0) | (k == 0)
        return {"stream": stream, "offset": offset, "length": length, "reset": reset}

    def valid_steps(self, step: int) -> int:
        """Trained steps of all lanes at `step`: the denominator of the per-step mean loss."""
        return int(self.chunks(step)["length"].sum())


def lane_stream(dataset: StreamDataset, sampler: StreamSampler, start_step: int) -> Iterator[tuple[int, dict]]:
    """Endless (epoch, batch) of this rank's lanes from optimizer step `start_step`; a batch also
    carries `reset` (bool [lanes]): which lanes start from a zero state."""
    step = start_step
    while True:
        where = sampler.chunks(step, sampler.rank_lanes)
        batch = dataset.read(where["stream"], where["offset"], where["length"], sampler.chunk)
        batch["reset"] = torch.from_numpy(where["reset"])
        yield sampler.position(step)[0], batch
        step += 1


class LaneState:
    """The hidden state [num_layers, lanes, H] of this rank's lanes, carried across chunks."""

    def __init__(self, num_layers: int, lanes: int, hidden_size: int, device: torch.device):
        self.h = torch.zeros(num_layers, lanes, hidden_size, device=device)

    def carried(self, reset: torch.Tensor) -> torch.Tensor:
        """The state to start this chunk from: zero for lanes that `reset`."""
        return torch.where(reset.to(self.h.device)[None, :, None], 0.0, self.h)

    def keep(self, h_n: torch.Tensor) -> None:
        """After the forward pass: detached (truncated BPTT), carried into the next chunk."""
        self.h = h_n.detach().float()

    def gather(self, accelerator: Any) -> torch.Tensor:
        """Every lane's state [B, num_layers, H], in global lane order. All ranks participate."""
        mine = self.h.transpose(0, 1).contiguous()
        return accelerator.gather(mine).cpu() if accelerator.num_processes > 1 else mine.cpu()

    def load(self, every_lane: torch.Tensor, lanes: np.ndarray) -> None:
        """This rank's lanes out of a checkpoint's [B, num_layers, H] (any world size saved it)."""
        layers, hidden = self.h.shape[0], self.h.shape[2]
        if every_lane.dim() != 3 or tuple(every_lane.shape[1:]) != (layers, hidden) or int(lanes.max()) >= len(every_lane):
            raise ValueError(
                f"the checkpoint's lane state has shape {tuple(every_lane.shape)}; this job has lanes "
                f"[{int(lanes.min())}, {int(lanes.max()) + 1}) of layers x hidden {self.h.shape[0]} x {self.h.shape[2]}"
            )
        self.h = every_lane[torch.from_numpy(lanes)].transpose(0, 1).contiguous().to(self.h.device)


# ----------------------------------------------------------------------------------- evaluation


class StreamEvalBatches:
    """Every step of every validation stream once, in chunks, with the state carried across them:
    what the evaluator (`dist_gru.infer.evaluate.evaluate`) reads in stream mode.

    The streams' chunks are laid end to end in stored order and split into `lanes` contiguous
    segments (sizes differ by at most one chunk); segment j is evaluated by rank j mod W, chunk by
    chunk, its state reset where a stream starts. The result does not depend on the world size."""

    def __init__(
        self,
        dataset: StreamDataset,
        lanes: int,
        chunk: int,
        rank: int,
        world_size: int,
        initial_state: Callable[[int], torch.Tensor],
    ):
        self.dataset, self.chunk = dataset, chunk
        counts = -(-dataset.lengths // chunk)
        self.stream = np.repeat(np.arange(len(counts)), counts)
        self.offset = (np.arange(len(self.stream)) - np.repeat(np.cumsum(counts) - counts, counts)) * chunk
        self.length = np.minimum(chunk, dataset.lengths[self.stream] - self.offset)
        segments = np.array_split(np.arange(len(self.stream)), min(lanes, len(self.stream)))
        self.mine = segments[rank::world_size]
        self.state = initial_state(len(self.mine))  # [num_layers, segments, H] (the model's `initial_state`)

    def __iter__(self) -> Iterator[dict]:
        for k in range(max((len(s) for s in self.mine), default=0)):
            active = np.array([j for j, s in enumerate(self.mine) if k < len(s)], dtype=np.int64)
            ids = np.array([self.mine[j][k] for j in active])
            batch = self.dataset.read(self.stream[ids], self.offset[ids], self.length[ids], self.chunk)
            batch["reset"] = torch.from_numpy((self.offset[ids] == 0) | (k == 0))
            self.active = torch.from_numpy(active)
            yield batch

    def carried(self, batch: dict) -> torch.Tensor:
        """The state this chunk's segments start from: zero where a stream starts."""
        reset = batch["reset"].to(self.state.device)
        return torch.where(reset[None, :, None], 0.0, self.state[:, self.active.to(self.state.device)])

    def keep(self, state: torch.Tensor) -> None:
        self.state[:, self.active.to(self.state.device)] = state.float()
