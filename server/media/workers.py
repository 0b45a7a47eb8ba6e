"""The front process's media workers: started, watched, restarted, and picked for new calls.

The front process owns the engine (and its inference thread) and the public
HTTP port; each worker is a spawned process (no torch imported there) that
connects back to the engine host. A worker that exits for any reason is
replaced, and the engine host has already freed the slots its calls held.
The process's main (`server.worker.worker_main`) is given by the caller: it runs
the signaling service, which sits above this package.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from ..engine import Engine
from ..engine.host import EngineHost, WorkerLink

log = logging.getLogger(__name__)

# A worker process's main: (index, engine socket path, signaling config, host addresses, log level).
WorkerMain = Callable[[int, str, object, "list[str] | None", str], None]


def session_prefix(index: int) -> str:
    """What the session ids of worker `index`'s calls start with, so the front routes by id alone."""
    return f"w{index}."


def default_worker_count(max_calls: int, cores: int | None = None) -> int:
    """One worker per 8 calls (what one event loop carries with room to spare), leaving a core for the
    engine and the front, and at least one."""
    cores = cores or os.cpu_count() or 2
    return max(1, min(cores - 1, -(-max_calls // 8)))


@dataclass
class WorkerProcess:
    index: int
    process: multiprocessing.Process
    link: WorkerLink | None = None
    offers_in_flight: int = 0


class MediaWorkers:
    def __init__(self, engine: Engine, count: int, config, worker_main: WorkerMain,
                 host_addresses: list[str] | None = None, log_level: str = "INFO", start_timeout_s: float = 60.0):
        """`worker_main`: each spawned process's entry, importable by name (spawn pickles it by reference)."""
        self.engine, self.count, self.config, self.worker_main = engine, count, config, worker_main
        self.host_addresses, self.log_level, self.start_timeout_s = host_addresses, log_level, start_timeout_s
        self._dir = tempfile.mkdtemp(prefix="moshi-webrtc-")
        self.host = EngineHost(engine, os.path.join(self._dir, "engine.sock"))
        self.host.link_listeners.append(self._on_hello)
        self.workers: dict[int, WorkerProcess] = {}
        self.restarts = 0
        self.exits: list[tuple[int, int | None]] = []  # (index, exit code) of every worker that ended
        self._stopping = False
        self._context = multiprocessing.get_context("spawn")
        self._hellos: dict[int, asyncio.Event] = {}

    def use_engine(self, engine: Engine) -> None:
        """Serve `engine` instead (the CLI falls back to the tiny model when the real one fails to load)."""
        self.engine = self.host.engine = engine

    async def start(self) -> None:
        """Start the engine host and every worker; returns once all have connected."""
        await self.host.start()
        for index in range(self.count):
            self._spawn(index)
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in self._hellos.values())),
                               self.start_timeout_s)

    async def stop(self) -> None:
        """Ask every worker to hang up and exit (SIGTERM), then end the engine host."""
        self._stopping = True
        processes = [worker.process for worker in self.workers.values()]
        for process in processes:
            if process.is_alive():
                process.terminate()
        loop = asyncio.get_running_loop()
        for process in processes:
            await loop.run_in_executor(None, process.join, 10)
            if process.is_alive():
                process.kill()
                await loop.run_in_executor(None, process.join, 5)
        await self.host.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- processes ---------------------------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        process = self._context.Process(
            target=self.worker_main, name=f"moshi-media-{index}", daemon=True,
            args=(index, self.host.path, self.config, self.host_addresses, self.log_level))
        process.start()
        self.workers[index] = WorkerProcess(index, process)
        self._hellos[index] = asyncio.Event()
        asyncio.get_running_loop().add_reader(process.sentinel, self._on_exit, index, process)
        log.info("media worker %d started (pid %d)", index, process.pid)

    def _on_hello(self, link: WorkerLink) -> None:
        worker = self.workers.get(link.index)
        if worker is None or worker.process.pid != link.pid:
            log.warning("a connection claiming to be media worker %s (pid %s) was not started here", link.index,
                        link.pid)
            link.channel.close()
            return
        worker.link = link
        self._hellos[link.index].set()

    def _on_exit(self, index: int, process: multiprocessing.Process) -> None:
        asyncio.get_running_loop().remove_reader(process.sentinel)
        process.join(0)
        self.exits.append((index, process.exitcode))
        if self._stopping or self.workers.get(index) is None or self.workers[index].process is not process:
            return
        log.error("media worker %d (pid %d) exited with %s: its calls have ended; starting a new one", index,
                  process.pid, process.exitcode)
        self.restarts += 1
        self._spawn(index)

    # -- routing -----------------------------------------------------------------------------------

    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.workers.values() if w.link is not None and not w.link.channel.closed
                and w.process.is_alive()]

    def pick(self) -> WorkerProcess | None:
        """The worker for a new call: the one with the fewest calls (offers under way included)."""
        candidates = self.alive()
        if not candidates:
            return None
        return min(candidates, key=lambda w: (len(w.link.calls) + w.offers_in_flight, w.index))

    def holding(self, session_id: str) -> WorkerProcess | None:
        """The worker whose calls carry this session id (None: no such worker running)."""
        for worker in self.alive():
            if session_id.startswith(self.config.session_id_prefix + session_prefix(worker.index)):
                return worker
        return None

    @contextlib.contextmanager
    def offer_under_way(self, worker: WorkerProcess):
        worker.offers_in_flight += 1
        try:
            yield
        finally:
            worker.offers_in_flight -= 1
