"""A gRPC server interceptor that keeps internals out of status details: an exception that is
not a deliberate abort (a bug, a database error whose text would name SQL, parameters or
another agent's id) is logged with a fresh error id and answered INTERNAL with that id only.

It also decodes requests itself, so bytes that are not the method's message are the caller's
error (INVALID_ARGUMENT), not gRPC's "Exception deserializing request!" (INTERNAL).

`ErrorIdInterceptor` serves the thread-pool server, `AsyncErrorIdInterceptor` the asyncio
server of the agent plane."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from .errors import new_error_id

log = logging.getLogger(__name__)


def _aborted(context: grpc.ServicerContext) -> bool:
    """True when the handler called context.abort (its exception carries a chosen status)."""
    code = context.code() if hasattr(context, "code") else None
    return code not in (None, grpc.StatusCode.OK)


def _internal(context: grpc.ServicerContext, method: str) -> None:
    error_id = new_error_id()
    log.exception("unexpected error %s in %s", error_id, method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error (error id {error_id})")


Decode = Callable[[bytes], Any]


def _decode(decode: Decode | None, data: Any, context: grpc.ServicerContext) -> Any:
    if decode is None:
        return data
    try:
        return decode(data)
    except DecodeError:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request is not a valid message of this method")


def _decoded(decode: Decode | None, request: Any, streaming: bool, context: grpc.ServicerContext) -> Any:
    if not streaming:
        return _decode(decode, request, context)
    return (_decode(decode, item, context) for item in request)


def _wrap_unary(
    fn: Callable[[Any, grpc.ServicerContext], Any], method: str, decode: Decode | None, streaming: bool
) -> Callable[..., Any]:
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(_decoded(decode, request, streaming, context), context)
        except Exception:
            if _aborted(context):
                raise
            _internal(context, method)

    return handler


def _wrap_stream(
    fn: Callable[[Any, grpc.ServicerContext], Iterator[Any]], method: str, decode: Decode | None, streaming: bool
) -> Callable[..., Any]:
    def handler(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from fn(_decoded(decode, request, streaming, context), context)
        except Exception:
            if _aborted(context):
                raise
            _internal(context, method)

    return handler


class ErrorIdInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        method, decode, encode = details.method, handler.request_deserializer, handler.response_serializer
        # request_deserializer=None: gRPC hands over the raw bytes and the wrapper decodes them
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method, decode, False), None, encode
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, method, decode, True), None, encode
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method, decode, False), None, encode
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method, decode, True), None, encode
            )
        return handler


# -- the same for the asyncio server (grpc.aio): handlers are coroutines or async generators ----


def _aio_aborted(e: BaseException, context: Any) -> bool:
    return isinstance(e, grpc.aio.AbortError) or _aborted(context)


async def _aio_internal(context: Any, method: str) -> None:
    error_id = new_error_id()
    log.exception("unexpected error %s in %s", error_id, method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (error id {error_id})")


async def _aio_decode(decode: Decode | None, data: Any, context: Any) -> Any:
    if decode is None:
        return data
    try:
        return decode(data)
    except DecodeError:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request is not a valid message of this method")


async def _aio_decoded_stream(decode: Decode | None, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
    async for item in requests:
        yield await _aio_decode(decode, item, context)


async def _aio_request(decode: Decode | None, request: Any, streaming: bool, context: Any) -> Any:
    if streaming:
        return _aio_decoded_stream(decode, request, context)
    return await _aio_decode(decode, request, context)


def _aio_wrap(fn: Callable[..., Any], method: str, decode: Decode | None, streaming: bool) -> Callable[..., Any]:
    """A coroutine handler (or one that writes its stream with `context.write`)."""

    async def handler(request: Any, context: Any) -> Any:
        try:
            return await fn(await _aio_request(decode, request, streaming, context), context)
        except Exception as e:
            if _aio_aborted(e, context):
                raise
            await _aio_internal(context, method)

    return handler


def _aio_wrap_gen(
    fn: Callable[..., AsyncIterator[Any]], method: str, decode: Decode | None, streaming: bool
) -> Callable[..., AsyncIterator[Any]]:
    """An async-generator handler (a server stream that yields its messages)."""

    async def handler(request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            async for item in fn(await _aio_request(decode, request, streaming, context), context):
                yield item
        except Exception as e:
            if _aio_aborted(e, context):
                raise
            await _aio_internal(context, method)

    return handler


class AsyncErrorIdInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """ErrorIdInterceptor for the asyncio server: the same answers, for coroutine handlers."""

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        method, decode, encode = details.method, handler.request_deserializer, handler.response_serializer

        def wrap(fn: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
            if inspect.isasyncgenfunction(fn):
                return _aio_wrap_gen(fn, method, decode, streaming)
            return _aio_wrap(fn, method, decode, streaming)

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, False), None, encode)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, True), None, encode)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, False), None, encode)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, True), None, encode)
        return handler
