"""One server interceptor for authentication, scopes, the tenant rule and the rate limit.

Each call, before its handler runs: open methods (health, OIP liveness/readiness) pass; else
the bearer token in `authorization` is verified (none or a bad one: UNAUTHENTICATED), the
method's scope is checked (PERMISSION_DENIED), then the caller's token bucket (RESOURCE_EXHAUSTED,
with the delay in the message and in the `grpc-retry-pushback-ms` trailer, which grpc's own
retry policy honours). Each request message's user ids are checked against the tenant rule
(PERMISSION_DENIED); on a stream, the first refused message ends the stream.

A stream that carries many calls as items (PER_ITEM_METHODS: ClassifyStream, what the gateway
multiplexes callers' Classify calls over) is admitted once, then each ITEM is checked as a
Classify call would be, by its handler through ITEM_CHECKS: the token's expiry, the tenant rule
and one token of the rate limit per item, so one refused item does not end the others.

With authentication off (development) only the rate limit applies, per peer address.
"""

from __future__ import annotations

import contextvars
import inspect
import math
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from grpc import aio

from snaplearn_common.interceptors import WrappingInterceptor
from snaplearn_common.security.principal import OPEN_METHODS, Principal, scope_for
from snaplearn_common.security.ratelimit import Limiter
from snaplearn_common.security.tokens import InvalidToken, TokenVerifier

RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
_BEARER = "bearer "

# Calls that carry many calls as items: the handler checks each item (ItemChecks), the
# interceptor does not check their request messages.
PER_ITEM_METHODS = frozenset({"/snaplearn.vision.v1.VisionService/ClassifyStream"})


def _rate_refusal(limiter: Limiter, key: str) -> tuple[int, str] | None:
    """(milliseconds to wait, message) when the caller's bucket is empty, else None (a token taken)."""
    wait_s = limiter.take(key)
    if wait_s <= 0.0:
        return None
    wait_ms = max(1, math.ceil(wait_s * 1000))
    return wait_ms, f"rate limit of {limiter.rate_per_s:g} calls/s for this caller; retry in {wait_ms} ms"


class ItemChecks:
    """Per item of a PER_ITEM_METHODS stream: the token's expiry (with the verifier's leeway,
    so an item is refused exactly when a Classify call with that token would be), the tenant
    rule, the rate limit (one token per item, from the caller's bucket)."""

    def __init__(
        self, principal: Principal | None, limiter: Limiter | None, key: str, *, leeway_s: float = 0.0
    ) -> None:
        self._principal = principal
        self._limiter = limiter
        self._key = key
        self._leeway_s = leeway_s

    def refusal(self, user_id: str) -> tuple[grpc.StatusCode, str] | None:
        principal = self._principal
        if principal is not None:
            if principal.expires_at is not None and time.time() >= principal.expires_at + self._leeway_s:
                return grpc.StatusCode.UNAUTHENTICATED, "the token has expired"
            refused = principal.refusal_for((user_id,))
            if refused is not None:
                return grpc.StatusCode.PERMISSION_DENIED, refused
        if self._limiter is not None:
            limited = _rate_refusal(self._limiter, self._key)
            if limited is not None:
                return grpc.StatusCode.RESOURCE_EXHAUSTED, limited[1]
        return None


ITEM_CHECKS: contextvars.ContextVar[ItemChecks | None] = contextvars.ContextVar(
    "snaplearn_item_checks", default=None
)


def user_ids_of(request: Any) -> Iterable[str]:
    """The student ids a request message acts for (none for messages without one)."""
    descriptor = getattr(request, "DESCRIPTOR", None)
    if descriptor is None:
        return ()
    fields = descriptor.fields_by_name
    if "user_id" in fields:
        return (request.user_id,)
    if "items" in fields and descriptor.name == "ClassifyStreamRequest":
        return [item.request.user_id for item in request.items]
    if "parameters" in fields and descriptor.name == "ModelInferRequest":
        parameter = request.parameters.get("user_id")
        return (parameter.string_param,) if parameter is not None else ()
    return ()


def _peer_host(context: aio.ServicerContext) -> str:
    peer = context.peer() or "unknown"
    return peer.rsplit(":", 1)[0]  # "ipv4:127.0.0.1:53412": one bucket per host, not per connection


class SecurityInterceptor(WrappingInterceptor):
    def __init__(self, verifier: TokenVerifier | None, limiter: Limiter | None) -> None:
        super().__init__()
        self._verifier = verifier
        self._limiter = limiter

    def _passes(self, method: str) -> bool:
        return method in OPEN_METHODS

    # -- the checks ---------------------------------------------------------------------------

    async def _admit(self, context: aio.ServicerContext, method: str) -> tuple[Principal | None, str]:
        """The caller's principal (None without authentication) and its rate-limit key."""
        principal = None
        if self._verifier is not None:
            principal = await self._authenticate(context)
            scope = scope_for(method)
            if not principal.allows(scope):
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{method} needs scope {scope.value if scope else 'any'!r}; the token has "
                    f"{', '.join(sorted(principal.scopes)) or 'none'}",
                )
        key = principal.subject if principal is not None else _peer_host(context)
        if self._limiter is not None:
            limited = _rate_refusal(self._limiter, key)
            if limited is not None:
                wait_ms, message = limited
                context.set_trailing_metadata(((RETRY_PUSHBACK_KEY, str(wait_ms)),))
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        return principal, key

    async def _authenticate(self, context: aio.ServicerContext) -> Principal:
        assert self._verifier is not None
        tokens = [
            value
            for key, value in context.invocation_metadata() or ()
            if key == "authorization" and isinstance(value, str)
        ]
        if not tokens:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "no bearer token: send 'authorization: Bearer <token>'"
            )
        header = tokens[0]
        if not header.lower().startswith(_BEARER):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization must be 'Bearer <token>'")
        try:
            return self._verifier.verify(header[len(_BEARER) :].strip())
        except InvalidToken as error:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))
        raise AssertionError("abort returned")  # pragma: no cover

    @staticmethod
    async def _check_tenant(context: aio.ServicerContext, principal: Principal | None, request: Any) -> None:
        if principal is None:
            return
        refusal = principal.refusal_for(user_ids_of(request))
        if refusal is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)

    # -- wrapping each kind of handler ----------------------------------------------------------

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        admit, check = self._admit, self._check_tenant
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }

        def checked_requests(
            requests: AsyncIterator[Any], context: aio.ServicerContext, principal: Principal | None
        ) -> AsyncIterator[Any]:
            async def each() -> AsyncIterator[Any]:
                async for request in requests:
                    await check(context, principal, request)
                    yield request

            return each() if principal is not None else requests

        if handler.unary_unary is not None:
            unary_unary = handler.unary_unary

            async def uu(request: Any, context: aio.ServicerContext) -> Any:
                principal, _ = await admit(context, method)
                await check(context, principal, request)
                return await unary_unary(request, context)

            return grpc.unary_unary_rpc_method_handler(uu, **kwargs)

        if handler.stream_unary is not None:
            stream_unary = handler.stream_unary

            async def su(requests: AsyncIterator[Any], context: aio.ServicerContext) -> Any:
                principal, _ = await admit(context, method)
                return await stream_unary(checked_requests(requests, context, principal), context)

            return grpc.stream_unary_rpc_method_handler(su, **kwargs)

        if handler.unary_stream is not None:
            unary_stream = handler.unary_stream

            async def us(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                principal, _ = await admit(context, method)
                await check(context, principal, request)
                async for response in _responses(unary_stream(request, context)):
                    yield response

            return grpc.unary_stream_rpc_method_handler(us, **kwargs)

        stream_stream = handler.stream_stream
        per_item = method in PER_ITEM_METHODS
        limiter = self._limiter
        leeway_s = self._verifier.leeway_s if self._verifier is not None else 0.0

        async def ss(requests: AsyncIterator[Any], context: aio.ServicerContext) -> AsyncIterator[Any]:
            principal, key = await admit(context, method)
            if per_item:
                # Set in the call's own task: the handler and the tasks it starts see it.
                ITEM_CHECKS.set(ItemChecks(principal, limiter, key, leeway_s=leeway_s))
                checked = requests
            else:
                checked = checked_requests(requests, context, principal)
            async for response in _responses(stream_stream(checked, context)):
                yield response

        return grpc.stream_stream_rpc_method_handler(ss, **kwargs)


async def _responses(result: Any) -> AsyncIterator[Any]:
    """A streaming handler's responses, whether it is an async generator or a coroutine that
    writes with context.write (then it yields nothing here)."""
    if inspect.isasyncgen(result) or hasattr(result, "__aiter__"):
        async for response in result:
            yield response
    else:
        await result
