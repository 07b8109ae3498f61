"""Loading a Python handler and invoking it the way the Lambda runtime does: a
``context`` object, a timeout, sync handlers off the event loop and async ones awaited;
for streamed responses, the handler's chunks one by one under the same timeout."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import sys
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Handler = Callable[[dict[str, Any], "LambdaContext"], Any]


class HandlerLoadError(Exception):
    """The handler spec does not name a callable that can be imported."""


def load_handler(spec: str, base_dir: Path | None = None) -> Handler:
    """Import ``module:function`` or ``path/to/file.py:function``.

    A relative file path is taken from ``base_dir`` (the config file's folder).
    """
    target, sep, func_name = spec.rpartition(":")
    if not sep or not target or not func_name:
        raise HandlerLoadError(f"{spec!r} must be 'module:function' or 'path/to/file.py:function'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise HandlerLoadError(f"{spec!r}: no such file {path}")
        module_name = f"sigproxy_handler_{path.stem}_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise HandlerLoadError(f"{spec!r}: cannot load {path}")
        module = importlib.util.module_from_spec(loader_spec)
        # Handlers import their siblings the way they would in a deployment package.
        sys.path.insert(0, str(path.parent))
        try:
            sys.modules[module_name] = module
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise HandlerLoadError(f"{spec!r}: importing {path} failed: {exc!r}") from exc
        finally:
            sys.path.remove(str(path.parent))
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise HandlerLoadError(f"{spec!r}: importing {target} failed: {exc!r}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise HandlerLoadError(f"{spec!r}: {target} has no function {func_name!r}")
    return func  # type: ignore[no-any-return]


@dataclass
class LambdaContext:
    """The parts of the Python runtime's context object handlers use."""

    function_name: str
    memory_limit_in_mb: int
    invoked_function_arn: str
    timeout: float
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    function_version: str = "$LATEST"
    log_group_name: str = ""
    log_stream_name: str = ""
    _deadline: float = 0.0

    def __post_init__(self) -> None:
        self.log_group_name = self.log_group_name or f"/aws/lambda/{self.function_name}"
        self.log_stream_name = self.log_stream_name or time.strftime("%Y/%m/%d/[$LATEST]local")
        self._deadline = time.monotonic() + self.timeout

    @property
    def deadline(self) -> float:
        """When the invocation times out, on the ``time.monotonic()`` clock."""
        return self._deadline

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


class InvocationTimeout(Exception):
    """The handler ran past its configured timeout."""


async def invoke(handler: Handler, event: dict[str, Any], context: LambdaContext) -> Any:
    """Run the handler with its timeout: ``async def`` handlers are awaited, plain ones
    run in a worker thread so the event loop keeps serving."""
    if inspect.iscoroutinefunction(handler):
        coro = handler(event, context)
    else:
        coro = asyncio.get_running_loop().run_in_executor(None, handler, event, context)
    try:
        return await asyncio.wait_for(coro, context.timeout)
    except TimeoutError:
        raise InvocationTimeout(f"Task timed out after {context.timeout:.2f} seconds") from None


class NotAStream(Exception):
    """A RESPONSE_STREAM handler returned something that is not a stream of chunks."""


_END = object()


async def _within(step: Awaitable[Any], context: LambdaContext) -> Any:
    """``step``, unless the invocation's deadline passes first."""
    try:
        return await asyncio.wait_for(step, context.deadline - time.monotonic())
    except TimeoutError:
        raise InvocationTimeout(f"Task timed out after {context.timeout:.2f} seconds") from None


async def invoke_stream(
    handler: Handler, event: dict[str, Any], context: LambdaContext
) -> AsyncGenerator[Any, None]:
    """The items of a streaming handler's result, each as it is produced, all within
    the function's timeout (InvocationTimeout once it passes).

    The handler (plain, ``async def`` or an async generator function) returns an
    iterator or async iterator; a sync iterator is advanced in a worker thread, so a
    ``time.sleep`` between chunks does not stop the event loop. A returned str or bytes
    is one chunk."""
    loop = asyncio.get_running_loop()
    if inspect.isasyncgenfunction(handler):
        result = handler(event, context)
    elif inspect.iscoroutinefunction(handler):
        result = await _within(handler(event, context), context)
    else:
        result = await _within(loop.run_in_executor(None, handler, event, context), context)

    if isinstance(result, str | bytes | bytearray | memoryview):
        yield result
    elif isinstance(result, AsyncIterator):
        try:
            while True:
                try:
                    item = await _within(anext(result), context)
                except StopAsyncIteration:
                    return
                yield item
        finally:
            aclose = getattr(result, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(aclose(), 1.0)
    elif isinstance(result, dict) or not isinstance(result, Iterator | list | tuple):
        raise NotAStream(
            f"invoke_mode RESPONSE_STREAM needs an iterator of chunks, got {type(result).__name__}"
        )
    else:
        chunks = iter(result)
        try:
            while True:
                item = await _within(loop.run_in_executor(None, next, chunks, _END), context)
                if item is _END:
                    return
                yield item
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                # A generator still running in its thread (after a timeout) cannot be
                # closed; it ends on its own, as an abandoned sync handler does.
                with contextlib.suppress(Exception):
                    close()
