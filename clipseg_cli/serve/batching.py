"""Gathering concurrent requests into model calls, on this machine (``--engine local``).

A request that has been decoded waits here for the model; when the model is free, the next call
takes what is waiting, after waiting (up to ``--max-wait-ms``) for the requests being decoded
at that moment, if any, to fill the call: a lone request never waits. The call runs on the
model's own thread, so the event loop keeps answering (refusals, health checks) meanwhile.
A request that was cancelled (its client left, its deadline passed) before its call started is
dropped: it costs the model nothing. Ray Serve's ``@serve.batch`` does the same on a cluster
(:mod:`.ray`); both hand the gathered jobs to :meth:`~clipseg_cli.serve.service.Service.predict`.

Once the server has been idle for :data:`IDLE_SECONDS`, the memory its requests freed is handed
back to the system (:func:`~clipseg_cli.run.memory.return_freed_memory`): the allocator keeps
freed pages otherwise, so the resident size between bursts would depend on the largest burst
so far rather than on what the server holds.
"""

from __future__ import annotations

import asyncio
from collections import deque

from clipseg_cli.run import memory
from clipseg_cli.run.items import Prediction
from clipseg_cli.serve.service import Job, Service

#: Seconds without a model call after which freed memory is handed back.
IDLE_SECONDS = 1.0


class LocalBatcher:
    """``await batcher.predict(job)``: the job's prediction, from a call shared with others."""

    def __init__(self, service: Service, max_wait_ms: float) -> None:
        self.service = service
        self.max_wait = max_wait_ms / 1000
        self.max_rows = service.policy.call_rows
        self._waiting: deque[tuple[Job, asyncio.Future]] = deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._idle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Start gathering (in the running event loop)."""
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="clipseg-batcher")

    async def stop(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for _job, future in self._waiting:
            future.cancel()

    async def predict(self, job: Job) -> Prediction:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((job, future))
        self._arrived.set()
        return await future

    def waiting_rows(self) -> int:
        return sum(job.rows for job, future in self._waiting if not future.done())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            deadline = loop.time() + self.max_wait
            while (
                self.waiting_rows() < self.max_rows
                and self.service.incoming > 0
                and (left := deadline - loop.time()) > 0
            ):
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
                self._arrived.clear()
            batch = self._take()
            if not batch:
                continue
            jobs = [job for job, _future in batch]
            try:
                found = await loop.run_in_executor(
                    self.service.model_thread, self.service.predict, jobs
                )
            except Exception as error:  # the model failed: these requests fail, the server stays
                for _job, future in batch:
                    if not future.done():
                        future.set_exception(error)
            else:
                for (_job, future), prediction in zip(batch, found, strict=True):
                    if not future.done():
                        future.set_result(prediction)
            if self._waiting:
                self._arrived.set()
            if self._idle is not None:
                self._idle.cancel()
            self._idle = loop.call_later(IDLE_SECONDS, self._when_idle, loop)

    def _when_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._waiting or self.service.incoming:
            return  # busy again: the next call sets the timer again
        loop.run_in_executor(self.service.model_thread, memory.return_freed_memory)

    def _take(self) -> list[tuple[Job, asyncio.Future]]:
        """Waiting jobs for one call, in order of arrival: up to ``max_rows`` model rows (at
        least one job, whatever its tiles); cancelled ones are dropped."""
        batch: list[tuple[Job, asyncio.Future]] = []
        rows = 0
        while self._waiting:
            job, future = self._waiting[0]
            if future.done():
                self._waiting.popleft()
                continue
            if batch and rows + job.rows > self.max_rows:
                break
            self._waiting.popleft()
            batch.append((job, future))
            rows += job.rows
        return batch
