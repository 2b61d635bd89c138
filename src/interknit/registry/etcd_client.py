"""A small etcd v3 client over aetcd's gRPC stubs: endpoint failover, transactions, leases,
and one raw watch stream.

aetcd's high-level ``Client`` talks to one endpoint and its watcher drops the ``canceled`` and
``compact_revision`` fields that a resuming watch must act on (etcd issue 8668), so this module
uses aetcd's generated stubs (``aetcd.rpc``) directly and keeps only what the registry needs.

Every failure to reach etcd (refused, reset, timed out, no leader) surfaces as one exception,
``EtcdUnavailable``; callers never see gRPC's own errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from aetcd import rpc

T = TypeVar("T")

log = logging.getLogger("interknit.registry.etcd")

# Ask the server to end a watch stream when its member loses the leader, so that a member cut
# off from quorum does not keep a watch open that will never deliver (etcd's WithRequireLeader).
_REQUIRE_LEADER = (("hasleader", "true"),)
# Detect a silently dead connection (a partition drops packets, it sends no reset). etcd
# refuses pings more often than its --grpc-keepalive-min-time (5 s by default) with a GOAWAY, and
# pings on a connection with no call open at all (so those are not sent).
_CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 6000),
    ("grpc.keepalive_timeout_ms", 3000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
_TRANSIENT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN", "INTERNAL")


# What gRPC says when it could not connect at all: the request never left this process.
_NOT_SENT = ("failed to connect", "connection refused", "dns resolution failed", "no route")


class EtcdUnavailable(Exception):
    """No endpoint answered in time. ``sent``: a request may have reached a member, and a
    write may then have been applied (or may still be: a member that got it may propose it
    late); False only when no attempt could connect at all."""

    def __init__(self, message: str, *, sent: bool = False) -> None:
        super().__init__(message)
        self.sent = sent


def _never_sent(exc: Any) -> bool:
    if exc.code().name != "UNAVAILABLE":
        return False
    details = (exc.details() or "").lower()
    return any(words in details for words in _NOT_SENT)


class EtcdError(Exception):
    """etcd answered, and refused (a bad request, a permission): not a reason to fail over."""


@dataclass(frozen=True, slots=True)
class KV:
    """One key as etcd holds it; ``mod_revision`` 0 means absent."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int

    @classmethod
    def from_pb(cls, kv: Any) -> KV:
        return cls(
            key=bytes(kv.key),
            value=bytes(kv.value),
            create_revision=int(kv.create_revision),
            mod_revision=int(kv.mod_revision),
            lease=int(kv.lease),
        )


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    # Keys read by range operations of the branch that ran, in order.
    ranges: list[list[KV]]


@dataclass(frozen=True, slots=True)
class EtcdTls:
    """What etcdctl's ``--cacert``, ``--cert`` and ``--key`` name, read into memory: the CA
    that signed the members' certificates (None: the system's roots), and this client's
    certificate and key for a cluster that asks for one (``--client-cert-auth``)."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None


def parse_endpoint(url: str) -> tuple[str, bool]:
    """``http://host:port``, ``https://host:port`` (or ``host:port``) as gRPC's ``host:port``
    target, and whether it speaks TLS."""
    target, secure = url, False
    if "://" in url:
        scheme, target = url.split("://", 1)
        if scheme not in ("http", "https"):
            raise ValueError(f"etcd endpoint {url!r}: only http:// and https:// are supported")
        secure = scheme == "https"
    target = target.rstrip("/")
    if ":" not in target.rsplit("]", 1)[-1]:
        target += ":2379"
    return target, secure


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that covers every key starting with ``prefix``."""
    out = bytearray(prefix)
    for i in reversed(range(len(out))):
        if out[i] < 0xFF:
            out[i] += 1
            return bytes(out[: i + 1])
    return b"\0"


# ---------------------------------------------------------------------- request builders


def cmp_create(key: bytes, revision: int) -> Any:
    """True when ``key`` was created at ``revision`` (0: the key is absent)."""
    return rpc.Compare(
        key=key,
        target=rpc.Compare.CREATE,
        result=rpc.Compare.EQUAL,
        create_revision=revision,
    )


def cmp_not_create(key: bytes, revision: int) -> Any:
    """True unless ``key`` is the one created at ``revision`` (absent, or created since)."""
    return rpc.Compare(
        key=key,
        target=rpc.Compare.CREATE,
        result=rpc.Compare.NOT_EQUAL,
        create_revision=revision,
    )


def cmp_mod(key: bytes, revision: int) -> Any:
    """True when ``key`` was last written at ``revision`` (0: the key is absent)."""
    return rpc.Compare(
        key=key,
        target=rpc.Compare.MOD,
        result=rpc.Compare.EQUAL,
        mod_revision=revision,
    )


def op_put(key: bytes, value: bytes, lease: int = 0, *, keep_lease: bool = False) -> Any:
    if keep_lease:
        return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, ignore_lease=True))
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


def op_delete(key: bytes) -> Any:
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))


def op_get(key: bytes) -> Any:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key))


# ---------------------------------------------------------------------- the client


class EtcdClient:
    """Unary calls go to the current endpoint; on a connection failure the next endpoint is
    tried, each at most once per call, all within ``timeout``."""

    def __init__(
        self, endpoints: Sequence[str], *, timeout: float = 2.0, tls: EtcdTls | None = None
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        parsed = [parse_endpoint(e) for e in endpoints]
        schemes = {secure for _, secure in parsed}
        if len(schemes) > 1:
            raise ValueError("etcd endpoints mix http:// and https://")
        self.secure = schemes == {True}
        if tls is not None and not self.secure:
            raise ValueError("TLS settings need https:// etcd endpoints")
        self.targets = [target for target, _ in parsed]
        self.timeout = timeout
        self._credentials: Any = None
        if self.secure:
            tls = tls or EtcdTls()
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
            )
        self._current = 0
        self._channels: dict[str, Any] = {}
        self._closed = False

    @property
    def target(self) -> str:
        return self.targets[self._current]

    def _channel(self, target: str) -> Any:
        channel = self._channels.get(target)
        if channel is None:
            if self._credentials is not None:
                channel = rpc.secure_channel(target, self._credentials, options=_CHANNEL_OPTIONS)
            else:
                channel = rpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
            self._channels[target] = channel
        return channel

    def rotate(self) -> None:
        """Move to the next endpoint (after this one failed)."""
        self._current = (self._current + 1) % len(self.targets)

    async def close(self) -> None:
        self._closed = True
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()

    async def _failover(
        self, attempt: Callable[[str, float], Awaitable[T]], what: str, share: bool = True
    ) -> T:
        """Run ``attempt(target, budget)`` on the current endpoint, moving to the next one on a
        connection failure or timeout, each endpoint at most once, all within ``timeout``."""
        if self._closed:
            raise EtcdUnavailable("the etcd client is closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        errors: list[str] = []
        sent = False
        for _ in range(len(self.targets)):
            target = self.target
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            # Give each endpoint a fair share of the time when there are several.
            budget = remaining if not share or len(self.targets) == 1 else max(remaining / 2, 0.2)
            try:
                return await attempt(target, budget)
            except TimeoutError:
                errors.append(f"{target}: {what} timed out")
                sent = True
            except rpc.AioRpcError as exc:
                code = exc.code().name
                if code not in _TRANSIENT:
                    raise EtcdError(f"etcd refused the {what}: {exc.details()}") from None
                errors.append(f"{target}: {exc.details() or code}")
                sent = sent or not _never_sent(exc)
            self.rotate()
        raise EtcdUnavailable("; ".join(errors) or "no etcd endpoint answered in time", sent=sent)

    async def _call(self, stub_cls: Any, method: str, request: Any) -> Any:
        async def attempt(target: str, budget: float) -> Any:
            stub = stub_cls(self._channel(target))
            return await getattr(stub, method)(request, timeout=budget)

        return await self._failover(attempt, "request")

    # ------------------------------------------------------------------ KV

    async def txn(
        self, compare: Sequence[Any], success: Sequence[Any], failure: Sequence[Any] = ()
    ) -> TxnResult:
        request = rpc.TxnRequest(
            compare=list(compare), success=list(success), failure=list(failure)
        )
        response = await self._call(rpc.KVStub, "Txn", request)
        ranges: list[list[KV]] = []
        for op in response.responses:
            if op.WhichOneof("response") == "response_range":
                ranges.append([KV.from_pb(kv) for kv in op.response_range.kvs])
        return TxnResult(bool(response.succeeded), int(response.header.revision), ranges)

    async def get_prefix(self, prefix: bytes) -> tuple[list[KV], int]:
        """Every key under ``prefix`` and the revision they were read at."""
        request = rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix))
        response = await self._call(rpc.KVStub, "Range", request)
        return [KV.from_pb(kv) for kv in response.kvs], int(response.header.revision)

    async def get(self, key: bytes) -> KV | None:
        response = await self._call(rpc.KVStub, "Range", rpc.RangeRequest(key=key))
        return KV.from_pb(response.kvs[0]) if response.kvs else None

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        request = rpc.PutRequest(key=key, value=value, lease=lease)
        response = await self._call(rpc.KVStub, "Put", request)
        return int(response.header.revision)

    async def compact(self, revision: int) -> None:
        request = rpc.CompactionRequest(revision=revision, physical=True)
        await self._call(rpc.KVStub, "Compact", request)

    # ------------------------------------------------------------------ leases

    async def grant(self, ttl: int, lease_id: int = 0) -> tuple[int, int]:
        """A new lease: (id, granted ttl)."""
        request = rpc.LeaseGrantRequest(TTL=ttl, ID=lease_id)
        response = await self._call(rpc.LeaseStub, "LeaseGrant", request)
        if response.error:
            raise EtcdError(f"etcd refused the lease: {response.error}")
        return int(response.ID), int(response.TTL)

    async def keepalive(self, lease_id: int) -> int:
        """Renew ``lease_id`` once; the remaining TTL, or 0 if the lease no longer exists."""

        async def attempt(target: str, budget: float) -> int:
            stub = rpc.LeaseStub(self._channel(target))
            async with asyncio.timeout(budget):
                call = stub.LeaseKeepAlive(
                    iter([rpc.LeaseKeepAliveRequest(ID=lease_id)]), timeout=budget
                )
                async for reply in call:
                    return int(reply.TTL)
                raise EtcdUnavailable(f"{target}: keepalive stream ended without a reply")

        return await self._failover(attempt, "keepalive", share=False)

    async def revoke(self, lease_id: int) -> None:
        with contextlib.suppress(EtcdError):  # already gone
            await self._call(rpc.LeaseStub, "LeaseRevoke", rpc.LeaseRevokeRequest(ID=lease_id))

    # ------------------------------------------------------------------ watch

    def watch(self, prefix: bytes, start_revision: int) -> WatchStream:
        return WatchStream(self, prefix, start_revision)


class WatchStream:
    """One watch on ``prefix`` from ``start_revision`` on the current endpoint.

    Iterate it for raw ``WatchResponse`` messages; it raises ``EtcdUnavailable`` when the stream
    breaks, and the caller resumes with a new stream from its last revision + 1.
    """

    def __init__(self, client: EtcdClient, prefix: bytes, start_revision: int) -> None:
        self._client = client
        self._requests: asyncio.Queue[Any] = asyncio.Queue()
        create = rpc.WatchCreateRequest(
            key=prefix,
            range_end=prefix_end(prefix),
            start_revision=start_revision,
            progress_notify=True,
        )
        self._requests.put_nowait(rpc.WatchRequest(create_request=create))
        self._call: Any = None

    async def _request_iter(self) -> AsyncIterator[Any]:
        while True:
            request = await self._requests.get()
            if request is None:
                return
            yield request

    async def responses(self) -> AsyncIterator[Any]:
        target = self._client.target
        stub = rpc.WatchStub(self._client._channel(target))
        self._call = stub.Watch(self._request_iter(), metadata=_REQUIRE_LEADER)
        try:
            async for response in self._call:
                yield response
        except rpc.AioRpcError as exc:
            self._client.rotate()
            detail = exc.details() or exc.code().name
            raise EtcdUnavailable(f"{target}: watch broke: {detail}") from None
        self._client.rotate()
        raise EtcdUnavailable(f"{target}: watch stream ended")

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()
        self._requests.put_nowait(None)
