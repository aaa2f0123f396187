"""The blocking client, for scripts without asyncio: :class:`SyncClient`.

It drives a :class:`~llmwsctl.client.Client` on a private event loop that runs in
a thread of its own, so it has the same methods, the same resume and the same
errors, each call blocking until its answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

from llmwsctl.client import Client

__all__ = ["SyncClient", "SyncStream"]

T = TypeVar("T")


class SyncClient:
    """The same client for scripts without asyncio: a private event loop runs in a thread.

    >>> with SyncClient() as c:
    ...     print(c.inference("What is the capital of France?"))
    """

    def __init__(self, url: str | None = None, token: str | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="llmws-client", daemon=True
        )
        self._thread.start()
        self.client = Client(url, token, **options)

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            raise

    @property
    def session_id(self) -> str | None:
        return self.client.session_id

    def connect(self, session_id: str | None = None) -> dict[str, Any]:
        return self._run(self.client.connect(session_id))

    def inference(self, prompt: str, system: str = "", **settings: Any) -> str:
        return self._run(self.client.inference(prompt, system, **settings))

    def stream(self, prompt: str, system: str = "", **settings: Any) -> SyncStream[str]:
        return SyncStream(self._loop, self.client.stream(prompt, system, **settings))

    def events(self, prompt: str, system: str = "", **settings: Any) -> SyncStream[dict[str, Any]]:
        return SyncStream(self._loop, self.client.events(prompt, system, **settings))

    def cancel(self) -> bool:
        return self._run(self.client.cancel())

    def reset(self) -> None:
        self._run(self.client.reset())

    def history(self) -> list[dict[str, str]]:
        return self._run(self.client.history())

    def set_config(self, **settings: Any) -> dict[str, Any]:
        return self._run(self.client.set_config(**settings))

    def get_resources(self) -> dict[str, Any]:
        return self._run(self.client.get_resources())

    def get_status(self) -> dict[str, Any]:
        return self._run(self.client.get_status())

    def list_models(self) -> list[dict[str, Any]]:
        return self._run(self.client.list_models())

    def switch_model(self, path: str) -> dict[str, Any]:
        return self._run(self.client.switch_model(path))

    def download_model(
        self,
        repo: str,
        target_dir: str,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        return self._run(self.client.download_model(repo, target_dir, on_progress))

    def disconnect(self) -> None:
        """Close the connection and stop the private loop; the object is done afterwards."""
        if self._loop.is_closed():
            return
        try:
            self._run(self.client.disconnect())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    close = disconnect

    def __enter__(self) -> SyncClient:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.disconnect()


class SyncStream(Iterator[T]):
    """Iterates an async iterator on the client's loop.

    One task on the loop reads the source into a queue, and ``next`` takes from the
    queue: a KeyboardInterrupt while waiting (or at any other moment in the caller's
    thread) loses nothing and starts no second read, so the caller can cancel the
    answer and keep reading it to its end.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, source: AsyncIterator[T]) -> None:
        self._loop = loop
        self._source = source
        self._items: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._pump: concurrent.futures.Future[None] | None = None
        self._task: asyncio.Task[Any] | None = None  # the reading task, on the loop
        self._ended = False

    async def _read(self) -> None:
        self._task = asyncio.current_task()
        try:
            async for item in self._source:
                self._items.put(("item", item))
        except Exception as e:  # the caller's next() raises it
            self._items.put(("error", e))
        else:
            self._items.put(("end", None))

    def __next__(self) -> T:
        if self._ended:
            raise StopIteration
        if self._pump is None:
            self._pump = asyncio.run_coroutine_threadsafe(self._read(), self._loop)
        kind, value = self._items.get()
        if kind == "item":
            return value  # type: ignore[no-any-return]
        self._ended = True
        if kind == "error":
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop reading; an unfinished answer is cancelled on the server."""
        self._ended = True
        asyncio.run_coroutine_threadsafe(self._aclose(), self._loop).result()

    async def _aclose(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the generator must be idle before it can be closed
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        aclose = getattr(self._source, "aclose", None)
        if aclose is not None:
            await aclose()
