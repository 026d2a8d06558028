"""web3 adapter: the node's JSON-RPC over HTTP, and new-head notifications over WebSocket.

The only collector module that imports web3. Raw JSON-RPC results go through the
mappers; every failure leaves as RpcError/MalformedRpcPayload with a message that never
contains the endpoint URL (keys live in it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from web3 import AsyncWeb3, WebSocketProvider
from web3.providers.rpc import AsyncHTTPProvider

from chainwatch.exceptions import (
    ConfigError,
    MalformedRpcPayload,
    RpcError,
    RpcMethodUnsupported,
)
from chainwatch.logs import redact_url, scrub
from chainwatch.schema import Block
from collector.mappers import hex_to_int, map_block

log = logging.getLogger("chainwatch.collector.rpc")


def check_url(url: str, schemes: tuple[str, ...], what: str) -> str:
    """One-line ConfigError for a URL the collector cannot use."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"{what} is not a valid URL: {redact_url(url)}") from None
    if parts.scheme not in schemes:
        raise ConfigError(
            f"{what} must start with {' or '.join(s + '://' for s in schemes)}"
            f" (got {parts.scheme + '://' if parts.scheme else 'no scheme'})"
        )
    if not parts.hostname:
        raise ConfigError(f"{what} has no host: {redact_url(url)}")
    return url


class NodeRpc:
    """One node's HTTP JSON-RPC, as a BlockSource for chain tracking."""

    def __init__(
        self,
        http_url: str,
        *,
        node: str,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.url = check_url(http_url, ("http", "https"), f"RPC URL of node {node!r}")
        self.node = node
        self.clock = clock
        self.on_error = on_error
        self.chain_id: int | None = None
        self._provider = AsyncHTTPProvider(
            http_url,
            request_kwargs={"timeout": timeout},
            exception_retry_configuration=None,
        )

    def __repr__(self) -> str:
        return f"NodeRpc(node={self.node!r}, url={redact_url(self.url)!r})"

    async def call(self, method: str, params: list[Any]) -> Any:
        try:
            response = await self._provider.make_request(method, params)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # aiohttp, timeouts, JSON decoding: all mean "no answer"
            self._failed(_transport_reason(exc))
            detail = scrub(str(exc))[:200] or type(exc).__name__
            raise RpcError(
                f"node {self.node!r} ({redact_url(self.url)}) did not answer {method}: "
                f"{type(exc).__name__}: {detail}"
            ) from None
        if not isinstance(response, dict):
            self._failed("malformed")
            raise MalformedRpcPayload(f"{method}: response is not a JSON object")
        if response.get("error"):
            error = response["error"]
            message = error.get("message") if isinstance(error, dict) else error
            code = error.get("code") if isinstance(error, dict) else None
            if _unsupported(method, code, str(message)):
                raise RpcMethodUnsupported(
                    f"node {self.node!r} does not offer {method}: {scrub(str(message))[:200]}"
                )
            self._failed("error_response")
            raise RpcError(
                f"node {self.node!r} answered {method} with error: {scrub(str(message))[:200]}"
            )
        if "result" not in response:
            self._failed("malformed")
            raise MalformedRpcPayload(f"{method}: response has no result")
        return response["result"]

    def _failed(self, reason: str) -> None:
        """Count one unusable answer (the bootstrap wires this to chainwatch_rpc_errors_total)."""
        if self.on_error is not None:
            self.on_error(reason)

    async def fetch_chain_id(self) -> int:
        self.chain_id = hex_to_int(await self.call("eth_chainId", []), "eth_chainId")
        return self.chain_id

    async def latest_number(self) -> int:
        return hex_to_int(await self.call("eth_blockNumber", []), "eth_blockNumber")

    async def block_by_number(self, number: int) -> Block | None:
        block = self._map(await self.call("eth_getBlockByNumber", [hex(number), True]))
        if block is not None and block.number != number:
            # a stale cache or a load balancer mixing nodes: followed as if it were the
            # block asked for, it would make a false reorg
            self._failed("wrong_block")
            raise MalformedRpcPayload(
                f"eth_getBlockByNumber({number}) answered block {block.number}"
            )
        return block

    async def block_by_hash(self, block_hash: str) -> Block | None:
        block = self._map(await self.call("eth_getBlockByHash", [block_hash, True]))
        if block is not None and block.hash != block_hash.lower():
            self._failed("wrong_block")
            raise MalformedRpcPayload(
                f"eth_getBlockByHash({block_hash[:18]}...) answered another block"
            )
        return block

    def _map(self, raw: Any) -> Block | None:
        if raw is None:
            return None
        assert self.chain_id is not None, "fetch_chain_id() first"
        try:
            return map_block(raw, chain_id=self.chain_id, node=self.node,
                             observed_at=self.clock())
        except MalformedRpcPayload:
            self._failed("malformed")
            raise

    async def close(self) -> None:
        await self._provider.disconnect()


def _transport_reason(exc: Exception) -> str:
    """Why a call got no answer, for chainwatch_rpc_errors_total."""
    if isinstance(exc, TimeoutError):  # asyncio's too, and aiohttp's ServerTimeoutError
        return "timeout"
    if isinstance(exc, aiohttp.ClientResponseError):
        return "http_status"
    if isinstance(exc, ValueError):  # JSONDecodeError, UnicodeDecodeError: not JSON
        return "invalid_json"
    return "unreachable"


_UNSUPPORTED_PHRASES = ("does not exist", "not available", "not found", "not supported")


def _unsupported(method: str, code: object, message: str) -> bool:
    """The node does not offer `method` at all (so callers stop asking).

    -32601 is the standard code; some nodes use -32000 with a message naming the method.
    A phrase alone is not enough: geth's "missing trie node ... state is not available"
    is transient, and taking it for "unsupported" would stop txpool polling for good.
    """
    if code == -32601:
        return True
    lowered = message.lower()
    return method.lower() in lowered and any(p in lowered for p in _UNSUPPORTED_PHRASES)


class Subscription:
    """One eth_subscribe stream over WebSocket; reconnects forever with backoff.

    `on_message` gets each notification's result; `on_gap` is called whenever the stream
    (re)starts or ends, because notifications may have been missed: the caller polls
    and backfills. web3 8 raises an RPC error answered on the socket inside its listener
    task, which ends the subscription stream: every end of the stream, clean or not,
    leads to a reconnect, and each is one `on_error` (a node closing the socket cleanly
    is still a gap). web3's own connect retries are off (it would retry for ~20 s with
    no word to us): each refused connect is one `on_error` and one `on_gap` here.
    """

    def __init__(
        self,
        ws_url: str,
        *,
        node: str,
        kind: str,
        argument: object = None,
        on_message: Callable[[Any], None],
        on_gap: Callable[[], None],
        on_error: Callable[[str], None],
        max_backoff: float = 30.0,
    ) -> None:
        self.url = check_url(ws_url, ("ws", "wss"), f"WebSocket URL of node {node!r}")
        self.node = node
        self.kind = kind
        self.argument = argument
        self.on_message = on_message
        self.on_gap = on_gap
        self.on_error = on_error
        self.max_backoff = max_backoff
        self.connected = False

    async def run(self) -> None:
        backoff = 1.0
        while True:
            try:
                provider = WebSocketProvider(self.url, max_connection_retries=1)
                async with AsyncWeb3(provider) as w3:
                    if self.argument is None:
                        await w3.eth.subscribe(self.kind)
                    else:
                        await w3.eth.subscribe(self.kind, self.argument)
                    self.connected = True
                    backoff = 1.0
                    self.on_gap()
                    async for message in w3.socket.process_subscriptions():
                        result = message.get("result") if isinstance(message, dict) else None
                        self.on_message(result)
                self.on_error(
                    f"WebSocket {self.kind} subscription to node {self.node!r} "
                    f"({redact_url(self.url)}) was closed by the node"
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.on_error(
                    f"WebSocket {self.kind} subscription to node {self.node!r} "
                    f"({redact_url(self.url)}) failed: {type(exc).__name__}: "
                    f"{scrub(str(exc))[:200]}"
                )
            self.connected = False
            self.on_gap()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)
