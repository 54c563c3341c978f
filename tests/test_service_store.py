"""Model registry and patch store against a real Redis (REDIS_URL when set, else the embedded one)."""

import asyncio
import time
import traceback
import uuid

import numpy as np
import pytest
from redis.asyncio import Redis

from patcher.methods.eraser import build_output_graph
from patcher.patch import Patch, PatchError
from service.patch_store import PatchNotFound, PatchStore, PatchUnservable
from service.registry import ModelRegistry, ModelSpec, UpstreamSpec


def _patch(alpha: float) -> Patch:
    graph = build_output_graph(3, 2, alpha, 0.0, "group", np.log(np.array([[0.7, 0.3], [0.4, 0.6]])))
    return Patch.build(method="eraser", n_classes=2, groups=["a", "b"], group_at_inference=True,
                       output_transform=graph)


def run(redis_url, body):
    async def main():
        redis = Redis.from_url(redis_url)
        prefix = f"test:{uuid.uuid4().hex[:8]}:"  # a namespace of its own on a shared Redis
        try:
            await body(redis, prefix)
        finally:
            keys = [k async for k in redis.scan_iter(f"{prefix}*")]
            if keys:
                await redis.delete(*keys)
            await redis.aclose()

    asyncio.run(main())


def test_registry_round_trip_and_version_order(redis_url):
    async def body(redis, prefix):
        reg = ModelRegistry(redis, prefix)
        for v in ("1", "10", "9"):
            await reg.put(ModelSpec(name="adult", version=v, upstream=UpstreamSpec(url="http://127.0.0.1:9000/")))
        assert await reg.versions("adult") == ["1", "9", "10"]
        spec = await reg.get("adult", "9")
        assert spec.upstream.url == "http://127.0.0.1:9000" and spec.group_input == "group"
        assert (await reg.latest("adult")).version == "10"
        assert len(await reg.list()) == 3
        assert await reg.delete("adult", "9") and not await reg.delete("adult", "9")
        assert await reg.get("adult", "9") is None

    run(redis_url, body)


def test_bad_specs_are_refused():
    with pytest.raises(ValueError):
        ModelSpec(name="../etc", upstream=UpstreamSpec(url="http://x"))
    with pytest.raises(ValueError, match="http"):
        UpstreamSpec(url="file:///etc/passwd")


def test_store_activate_and_serve_from_memory(redis_url):
    async def body(redis, prefix):
        store = PatchStore(redis, prefix)
        p1, p2 = _patch(1.0).for_model("adult", "1"), _patch(2.0).for_model("adult", "1")
        id1, id2 = await store.put(p1), await store.put(p1)
        assert id1 == id2 == p1.id  # content-addressed, written once
        await store.put(p2)
        assert [pid for pid, _ in await store.list("adult", "1")] == [p1.id, p2.id]
        assert await store.runner("adult", "1") is None  # nothing active: serve unpatched
        await store.activate("adult", "1", p2.id)
        runner = await store.runner("adult", "1")
        assert runner.patch.id == p2.id
        # served from memory: even with the pointer gone from Redis, no round trip happens
        await redis.delete(f"{prefix}active:adult:1")
        assert (await store.runner("adult", "1")).patch.id == p2.id
        await store.refresh()  # the periodic re-check notices
        assert await store.runner("adult", "1") is None

    run(redis_url, body)


def test_patch_for_another_version_is_refused(redis_url):
    async def body(redis, prefix):
        store = PatchStore(redis, prefix)
        pid = await store.put(_patch(1.0).for_model("adult", "1"))
        with pytest.raises(PatchError, match="not adult version 2"):
            await store.activate("adult", "2", pid)
        with pytest.raises(PatchError, match="bound to a model version"):
            await store.put(_patch(1.0))
        with pytest.raises(PatchNotFound):
            await store.activate("adult", "1", "0" * 64)

    run(redis_url, body)


def test_corrupted_blob_in_redis_is_refused(redis_url):
    async def body(redis, prefix):
        store = PatchStore(redis, prefix)
        p = _patch(1.0).for_model("adult", "1")
        await redis.set(f"{prefix}patch:{p.id}", _patch(3.0).for_model("adult", "1").to_bytes())
        with pytest.raises(PatchError, match="not the expected"):
            await store.activate("adult", "1", p.id)

    run(redis_url, body)


async def until(condition, what: str, bound_s: float = 60.0) -> None:
    """Wait for an async condition, polling; fail after a generous bound."""
    deadline = time.monotonic() + bound_s
    while not await condition():
        assert time.monotonic() < deadline, f"waited {bound_s:g} s for: {what}"
        await asyncio.sleep(0.02)


async def _subscribers(redis, channel: str) -> bool:
    return dict(await redis.pubsub_numsub(channel)).get(channel.encode(), 0) > 0


async def _active(store: PatchStore, pid: str | None) -> bool:
    runner = await store.runner("adult", "1")
    return (runner.patch.id if runner is not None else None) == pid


def test_a_second_replica_follows_pubsub(redis_url):
    async def body(redis, prefix):
        writer, reader = PatchStore(redis, prefix), PatchStore(Redis.from_url(redis_url), prefix, recheck_s=60)
        pid = await writer.put(_patch(1.0).for_model("adult", "1"))
        assert await reader.runner("adult", "1") is None  # the reader has seen this version
        reader.start()
        try:
            channel = f"{prefix}patch-events"
            await until(lambda: _subscribers(redis, channel), "the reader subscribes")
            await writer.activate("adult", "1", pid)  # the reader re-checks only every 60 s: pub/sub tells it
            await until(lambda: _active(reader, pid), "the reader serves the patch")
            await writer.deactivate("adult", "1")
            await until(lambda: _active(reader, None), "the reader serves unpatched")
        finally:
            await reader.stop()
            await reader.redis.aclose()

    run(redis_url, body)


def test_a_refused_pointer_raises_a_fresh_error_each_request(redis_url):
    """A refusal remembered for a pointer is raised anew per request: one exception re-raised would grow its
    traceback (and keep each request's frames, bodies included) on every call."""
    async def body(redis, prefix):
        store = PatchStore(redis, prefix)
        pid = await store.put(_patch(1.0).for_model("adult", "1"))
        await redis.set(f"{prefix}active:adult:2", pid)  # version 2's pointer, behind the API's back
        seen = []
        for _ in range(3):
            with pytest.raises(PatchUnservable, match="not adult version 2") as e:
                await store.runner("adult", "2")
            seen.append(e.value)
        assert len({id(x) for x in seen}) == 3
        depth = [len(traceback.extract_tb(x.__traceback__)) for x in seen]
        assert depth[1] == depth[2], depth  # the remembered refusal does not grow

    run(redis_url, body)
