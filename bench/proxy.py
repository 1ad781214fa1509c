"""A TCP proxy that adds a fixed one-way delay, standing in for a WAN link.

This kernel has no netem, so WAN conditions are made in user space: every
chunk read from one side is held for ``delay_ms`` and then written to the other
side, in order. Reading and writing are separate tasks joined by a FIFO queue,
so the link stays pipelined (throughput is not capped by the delay) while every
round trip pays ``2 * delay_ms``: the same shape as a long, fat network path.

The proxy only ever listens on 127.0.0.1 and only forwards to the target it was
given (a lab host's sshd), so it opens nothing to the outside. It keeps its own
accounting (bytes each way, chunks, the shortest hold it applied) so tests can
check that it forwards correctly and really applies the configured delay
without timing anything from outside.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
CHUNK = 64 * 1024


@dataclass
class LinkStats:
    """What one proxy has forwarded, in its own accounting."""

    delay_ms: float
    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    chunks: int = 0
    min_hold_ms: Optional[float] = None

    def record(self, upstream: bool, size: int, hold_s: float) -> None:
        """Count one forwarded chunk and how long it was held."""
        if upstream:
            self.bytes_up += size
        else:
            self.bytes_down += size
        self.chunks += 1
        hold_ms = hold_s * 1000.0
        if self.min_hold_ms is None or hold_ms < self.min_hold_ms:
            self.min_hold_ms = hold_ms


@dataclass
class DelayProxy:
    """One listening socket on 127.0.0.1 forwarding to *target* with a delay."""

    target: Tuple[str, int]
    delay_ms: float
    port: int = 0
    stats: LinkStats = field(init=False)
    _server: Optional[asyncio.base_events.Server] = field(default=None, init=False, repr=False)
    _tasks: List["asyncio.Task[None]"] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.delay_ms < 0:
            raise ValueError(f"delay must be >= 0 ms, not {self.delay_ms}")
        self.stats = LinkStats(self.delay_ms)

    async def start(self) -> int:
        """Start listening; return the port."""
        self._server = await asyncio.start_server(self._serve, LOOPBACK, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        """Stop listening and drop every open link."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError as exc:
            logger.warning("proxy %s:%d -> %s:%d: %s", LOOPBACK, self.port, *self.target, exc)
            client_w.close()
            return
        tasks = [asyncio.ensure_future(self._pump(client_r, server_w, True)),
                 asyncio.ensure_future(self._pump(server_r, client_w, False))]
        self._tasks.extend(tasks)
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in tasks:
                if task in self._tasks:
                    self._tasks.remove(task)
            for writer in (client_w, server_w):
                writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool) -> None:
        """Copy one direction, holding each chunk for the delay, in order."""
        loop = asyncio.get_running_loop()
        delay = self.delay_ms / 1000.0
        queue: "asyncio.Queue[Tuple[float, bytes]]" = asyncio.Queue(maxsize=256)

        async def read() -> None:
            try:
                while True:
                    data = await reader.read(CHUNK)
                    await queue.put((loop.time(), data))
                    if not data:
                        return
            except (ConnectionError, OSError):
                # A reset (a client exiting with bytes unread) ends this direction like an EOF;
                # without the sentinel the other end's connection (an sshd) was kept forever.
                await queue.put((loop.time(), b""))

        feeder = asyncio.ensure_future(read())
        try:
            while True:
                received, data = await queue.get()
                due = received + delay
                while loop.time() < due:
                    await asyncio.sleep(due - loop.time())
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
                self.stats.record(upstream, len(data), loop.time() - received)
        except (ConnectionError, OSError):
            return
        finally:
            feeder.cancel()


class ProxySet:
    """Delay proxies running on their own event-loop thread."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="delay-proxies", daemon=True)
        self._thread.start()
        self.proxies: Dict[str, DelayProxy] = {}

    def _call(self, coro: "asyncio.Future", timeout: float = 30.0):  # type: ignore[type-arg]
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def add(self, name: str, target: Tuple[str, int], delay_ms: float) -> DelayProxy:
        """Start a proxy called *name* in front of *target*; return it."""
        proxy = DelayProxy(target, delay_ms)
        self._call(proxy.start())
        self.proxies[name] = proxy
        logger.debug("proxy %s: 127.0.0.1:%d -> %s:%d (+%g ms each way)", name, proxy.port,
                     target[0], target[1], delay_ms)
        return proxy

    def close(self) -> None:
        """Stop every proxy and the loop thread."""
        for proxy in self.proxies.values():
            try:
                self._call(proxy.close(), timeout=10)
            except Exception as exc:  # pragma: no cover - best effort on shutdown
                logger.debug("closing proxy: %s", exc)
        self.proxies.clear()
        try:
            self._call(_cancel_all(), timeout=10)
        except Exception as exc:  # pragma: no cover - best effort on shutdown
            logger.debug("cancelling proxy tasks: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> "ProxySet":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


async def _cancel_all() -> None:
    """Cancel every other task on the running loop and wait for them to finish."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

