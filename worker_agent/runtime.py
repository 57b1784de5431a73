"""AgentRuntime: one asyncio event loop on a daemon thread, hosting one or many agent clients.

An engine process runs one agent, so one runtime with one client. The simulator runs hundreds of
clients in one process on a single runtime: every stream is a coroutine on the same loop, which
is far lighter than a thread (or two) per stream.

Thread-safety: the loop and everything created on it (channels, calls, the clients' ledgers)
belong to the runtime thread. Other threads only use :meth:`call_soon` (non-blocking, never
raises) and :meth:`submit` (returns a ``concurrent.futures.Future``; blocking on it is the
caller's choice and never done on the engine's forward path).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import grpc

__all__ = ["AgentRuntime", "ChannelOptions"]

_log = logging.getLogger(__name__)

T = TypeVar("T")
ChannelOptions = Sequence[tuple[str, Any]]


class AgentRuntime:
    """A started event loop on a daemon thread, plus a cache of gRPC channels.

    Args:
        name: the thread's name (shows in stack dumps and ``py-spy``).
    """

    def __init__(self, name: str = "eplb-agent") -> None:
        self.loop = asyncio.new_event_loop()
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        self._closed = False
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._started.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        self.loop.run_forever()

    @property
    def closed(self) -> bool:
        return self._closed

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> bool:
        """Schedule ``callback(*args)`` on the loop. Any thread; never blocks or raises.

        Returns False when the runtime is closed (the callback is dropped).
        """
        if self._closed:
            return False
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # loop closed between the check and the call
            return False
        return True

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the loop; returns its future. Not from the loop thread itself."""
        if self._closed:
            coro.close()
            raise RuntimeError("agent runtime is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (at most ``timeout_s``)."""
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError("AgentRuntime.run called from the runtime's own thread")
        return self.submit(coro).result(timeout_s)

    def channel(
        self,
        target: str,
        *,
        key: str = "",
        options: ChannelOptions = (),
        credentials: grpc.ChannelCredentials | None = None,
    ) -> grpc.aio.Channel:
        """The channel to ``target`` shared by every caller passing the same ``key``. Loop thread.

        A client with a key of its own gets its own HTTP/2 connection.
        """
        assert self.in_loop_thread(), "channels are created on the runtime thread"
        cache_key = (target, key)
        channel = self._channels.get(cache_key)
        if channel is None:
            if credentials is None:
                channel = grpc.aio.insecure_channel(target, options=list(options))
            else:
                channel = grpc.aio.secure_channel(target, credentials, options=list(options))
            self._channels[cache_key] = channel
        return channel

    async def _shutdown(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks(self.loop) if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
        await self.loop.shutdown_default_executor()  # threads of prepare hooks

    def close(self, timeout_s: float = 5.0) -> None:
        """Cancel every task, close the channels, stop the loop and join its thread."""
        if self._closed:
            return
        if self.in_loop_thread():
            raise RuntimeError("AgentRuntime.close called from the runtime's own thread")
        try:
            self.submit(self._shutdown()).result(timeout_s)
        except Exception:
            _log.warning("agent runtime did not shut down cleanly", exc_info=True)
        self._closed = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.loop.close()
