"""The step loop: one epoch of optimizer steps over the training images.

One image at a time goes through `StreamingCNN(model.stream)` (tile by tile) and the head;
`accumulate` images make one optimizer step (the paper's serial mini-batch). With N ranks,
positions in the epoch's order are cut into groups of N x accumulate (the last may be
smaller), one step each: rank r trains its share of the group, the ranks sum their
gradients (`DataParallel.sum_gradients`), then every rank steps. The next image is read and
prepared by a background thread while the current one trains.

A stop asked for between images ends the epoch at the last completed step (one process drops
its partial group and rewinds the RNG to the step; ranks finish the step together) and
writes last.pt.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from sstream.data import PixelSource, Sample
from sstream.distributed import DataParallel
from sstream.errors import SstreamError
from sstream.models import streamed_logits
from sstream.runtime import autocast, reset_peak_memory
from sstream.training import images
from sstream.training.checkpoint import Checkpoints, TrainState
from sstream.training.reporting import TrainEvents
from sstream.training.setup import TrainingParts


class TrainingError(SstreamError, RuntimeError):
    """Training cannot go on (e.g. a NaN loss); the last good checkpoint is kept."""


class GroupResult(NamedTuple):
    """One optimizer step's group, summed over the ranks."""

    loss_sum: float
    tiles: int
    stop: bool    # a rank was asked to stop: all stop after this step


class StepLoop:
    """Trains epochs step by step; owns the thread that loads the next image."""

    def __init__(self, parts: TrainingParts, parallel: DataParallel, events: TrainEvents,
                 checkpoints: Checkpoints, should_stop: Callable[[], bool]) -> None:
        self.parts, self.parallel, self.events = parts, parallel, events
        self.checkpoints, self.should_stop = checkpoints, should_stop
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sstream-prefetch")

    def close(self) -> None:
        """Stop the loading thread (a load under way is waited for, queued ones dropped)."""
        self.pool.shutdown(wait=True, cancel_futures=True)

    def train_epoch(self, epoch: int, state: TrainState) -> bool:
        """Train `epoch` from `state.image_index`; False when stopped (checkpoint saved)."""
        parts, parallel = self.parts, self.parallel
        order = images.epoch_order(parts.config.seed, epoch, len(parts.train_samples),
                                   parts.sampling)
        count = len(order)
        group = parallel.world_size * parts.config.accumulate
        starts = range(state.image_index, count, group)
        mine = [i for start in starts for i in parallel.shard(start, min(start + group, count))]
        self.events.on_epoch_start(epoch, parts.config.epochs, count)
        parts.model.train()
        reset_peak_memory(parts.device)
        parts.optimizer.zero_grad(set_to_none=True)
        loads = _Loads(lambda position: self._start_load(epoch, order, mine, position))
        started = time.perf_counter()
        for start in starts:
            stop = min(start + group, count)
            result = self._train_group(epoch, state, order, loads, (start, stop, count))
            if result is None:  # one process, asked to stop mid-group
                return False
            self._step()
            state.add_step(stop, result.loss_sum, result.tiles, time.perf_counter() - started)
            started = time.perf_counter()
            self.checkpoints.mark_step()
            if result.stop:
                self.checkpoints.save(state, "last.pt")
                return False
        return True

    def _train_group(self, epoch: int, state: TrainState, order: np.ndarray, loads: _Loads,
                     span: tuple[int, int, int]) -> GroupResult | None:
        """This rank's share of the group `span` = (start, stop, the epoch's count), its
        gradients summed over the ranks. None where one process was asked to stop mid-group:
        back at the last step, last.pt written. An error on any rank stops every rank
        (RankFailure)."""
        parallel = self.parallel
        start, stop, count = span
        group_loss, group_tiles, stop_wanted, error = 0.0, 0, False, None
        try:
            for index in parallel.shard(start, stop):
                loaded = loads.next()
                source, mask, sample = loaded.source, loaded.mask, loaded.sample
                try:
                    if mask is _NOT_MADE:
                        mask = images.sample_output_mask(source, self.parts.scnn, sample)
                    loss = self._train_image(source, mask, sample, stop - start, state,
                                             lambda: loads.prepare_next(self._prepare))
                finally:
                    source.close()
                tiles = len(self.parts.scnn.plan(source.shape))
                group_loss, group_tiles = group_loss + loss, group_tiles + tiles
                # (rank 0 reports: its group's other images are being done alongside)
                self.events.on_image(epoch, min(index + parallel.world_size, stop), count,
                                     loss, tiles)
                if index + parallel.world_size < stop and self.should_stop():
                    if not parallel.distributed:    # drop the partial group: back to the step
                        self.checkpoints.rewind_to_step()
                        self.checkpoints.save(state, "last.pt")
                        return None
                    stop_wanted = True              # ranks stop together, after this step
        except Exception as exc:
            if not parallel.distributed:
                raise
            error = exc
        stop_wanted = self.should_stop() or stop_wanted
        where = f"at optimizer step {state.step + 1}"
        parallel.check(error, where)
        loss_sum, tiles_sum, stops = parallel.sum_values([group_loss, group_tiles, stop_wanted],
                                                         where)
        parallel.sum_gradients(self.parts.params, where)
        return GroupResult(loss_sum, int(tiles_sum), bool(stops))

    def _train_image(self, source: PixelSource, mask: torch.Tensor | None, sample: Sample,
                     group_size: int, state: TrainState,
                     before_backward: Callable[[], None]) -> float:
        """Forward and backward one image (`mask`: its output mask); gradients accumulate
        (loss / group size). `before_backward` runs between the two (on this thread)."""
        parts = self.parts
        with autocast(parts.device, parts.config.amp, parts.amp_dtype):
            logits = streamed_logits(parts.model, parts.scnn, source, mask,  # (1, classes)
                                     whole_slide=parts.config.whole_slide)
        # at least float32 for the loss (float64 models stay float64)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        loss = parts.task.loss(logits, [sample.label])
        if not torch.isfinite(loss):
            raise TrainingError(f"the loss became {loss.item()} at optimizer step "
                                f"{state.step}; stopped, keeping the last good checkpoint "
                                "(lower --lr, or try without --amp)")
        scaled = loss / group_size
        before_backward()
        if parts.scaler is not None:
            parts.scaler.scale(scaled).backward()
        else:
            scaled.backward()
        return float(loss.item())

    def _step(self) -> None:
        parts = self.parts
        if parts.scaler is not None:
            parts.scaler.step(parts.optimizer)
            parts.scaler.update()
        else:
            parts.optimizer.step()
        parts.optimizer.zero_grad(set_to_none=True)

    def _start_load(self, epoch: int, order: np.ndarray, mine: list[int], position: int
                    ) -> Future | None:
        """Start loading this rank's `position`-th image of the epoch (None past the end)."""
        if position >= len(mine):
            return None
        index = mine[position]
        sample = self.parts.train_samples[int(order[index])]
        return self.pool.submit(self._load_ahead, sample, (epoch, 1, index))

    def _load_ahead(self, sample: Sample, seed_keys: tuple[int, ...]) -> _Loaded:
        """(On the loading thread.) The next image and its output mask, with the first
        regions of a lazily read slide already decoding: the regions its pooled forward will
        read are announced to the read-ahead while the current image trains. The mask is
        made here only where the image's shape has been planned (making it asks for the
        output's size); elsewhere it is `_NOT_MADE`, and `_prepare` (on the training thread,
        during the current image's step) or the image's own turn makes it."""
        parts = self.parts
        source = images.load_training_image(sample, parts.config, True, seed_keys,
                                            parts.dtype, parts.tissue)
        loaded = _Loaded(source, _NOT_MADE, sample)
        if not (self._reads_ahead(source) and parts.scnn.planned(source.shape)):
            return loaded
        try:
            self._announce(loaded)
        except BaseException:  # (no tissue under the image:) the slide is not handed on
            source.close()
            raise
        return loaded

    def _prepare(self, loaded: _Loaded) -> None:
        """(On the training thread, between the current image's forward and backward.)
        Plan the next image's shape, make its output mask and announce its pooled forward's
        reads, so that its first regions decode during the current backward. The loading
        thread cannot do this for a shape not planned yet: planning traces the stream and
        runs it on the meta device, which must not happen beside a running forward. What
        fails here is left for the image's own turn, which reports it."""
        if loaded.mask is not _NOT_MADE or not self._reads_ahead(loaded.source):
            return
        try:
            self.parts.scnn.halo_program(loaded.source.shape, training=False)
            self._announce(loaded)
        except Exception:  # noqa: S110 - made again, and reported, when its turn comes
            loaded.mask = _NOT_MADE

    def _announce(self, loaded: _Loaded) -> None:
        """Make the image's output mask and announce its pooled forward's reads (its shape
        planned)."""
        scnn = self.parts.scnn
        loaded.mask = images.sample_output_mask(loaded.source, scnn, loaded.sample)
        loaded.source.expect(scnn.pooled_reads(loaded.source.shape, loaded.mask))

    def _reads_ahead(self, source: PixelSource) -> bool:
        """Whether the image is read lazily by a read-ahead on the whole-slide path (the
        path whose reads the engine can list before the forward)."""
        return bool(source.read_ahead) and self.parts.config.whole_slide


_NOT_MADE = object()  # an output mask the loading thread left for the training thread


@dataclass
class _Loaded:
    """An image the loading thread prepared: its source, its output mask (or `_NOT_MADE`)
    and its sample."""

    source: PixelSource
    mask: torch.Tensor | None | object
    sample: Sample


class _Loads:
    """This rank's images of one epoch in turn, each loading on the thread while the one
    before trains; `start(position)` starts the position-th load (None past the end)."""

    def __init__(self, start: Callable[[int], Future | None]) -> None:
        self.start, self.position = start, 0
        self.pending = start(0)

    def next(self) -> _Loaded:
        """The next image (waiting for its load); the one after starts loading."""
        loaded = self.pending.result()
        self.position += 1
        self.pending = self.start(self.position)
        return loaded

    def prepare_next(self, prepare: Callable[[_Loaded], None]) -> None:
        """`prepare` the image loading after the current one if its load has finished
        (without waiting for it: a load still running, failed or cancelled is left alone)."""
        pending = self.pending
        if pending is not None and pending.done() and not pending.cancelled() \
                and pending.exception() is None:
            prepare(pending.result())
