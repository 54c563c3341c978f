"""Patches in Redis, per model version, with an in-process cache so serving never waits on Redis.

Layout (prefix `fp:`):
- `patch:{id}` -> the patch bytes, written with SET NX (content-addressed: a write never changes it)
- `patches:{model}:{version}` -> sorted set of patch ids made for that version, scored by time
- `active:{model}:{version}` -> the id of the active patch (absent = serve unpatched)
- channel `patch-events` -> `{model}\\x00{version}` whenever an active pointer changes

Every gateway replica keeps the active pointers it has seen and a `PatchRunner` per patch id. A
pub/sub listener refreshes a pointer when told, and a periodic re-check catches messages that
pub/sub dropped. Patches are verified against their id when fetched; a patch bound to another
model version is refused at activation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from redis.asyncio import Redis

from patcher.apply import PatchRunner
from patcher.patch import Patch, PatchError

log = logging.getLogger("fairpatch.service")


class PatchNotFound(LookupError):
    pass


class PatchStore:
    def __init__(self, redis: Redis, prefix: str = "fp:", recheck_s: float = 5.0) -> None:
        self.redis = redis
        self.prefix = prefix
        self.recheck_s = recheck_s
        self._active: dict[tuple[str, str], str | None] = {}  # (model, version) -> patch id
        self._runners: dict[str, PatchRunner] = {}
        self._tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------------ writes
    async def put(self, patch: Patch) -> str:
        """Store a patch made for one model version (its manifest's `model`); returns its id."""
        patch.verify()
        bound = patch.manifest.get("model") or {}
        if not bound.get("name") or not bound.get("version"):
            raise PatchError("a stored patch must be bound to a model version (Patch.for_model)")
        pid = patch.id
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(f"{self.prefix}patch:{pid}", patch.to_bytes(), nx=True)
            pipe.zadd(f"{self.prefix}patches:{bound['name']}:{bound['version']}", {pid: time.time()}, nx=True)
            await pipe.execute()
        return pid

    async def activate(self, model: str, version: str, patch_id: str) -> Patch:
        patch = await self.get(patch_id)
        patch.check_model(model, version)  # never apply a patch to another model version
        await self.redis.set(f"{self.prefix}active:{model}:{version}", patch_id)
        await self._announce(model, version, patch_id)
        return patch

    async def deactivate(self, model: str, version: str) -> None:
        await self.redis.delete(f"{self.prefix}active:{model}:{version}")
        await self._announce(model, version, None)

    async def _announce(self, model: str, version: str, patch_id: str | None) -> None:
        self._active[(model, version)] = patch_id
        await self.redis.publish(f"{self.prefix}patch-events", f"{model}\x00{version}")

    # ------------------------------------------------------------------ reads
    async def get(self, patch_id: str) -> Patch:
        runner = self._runners.get(patch_id)
        if runner is not None:
            return runner.patch
        raw = await self.redis.get(f"{self.prefix}patch:{patch_id}")
        if raw is None:
            raise PatchNotFound(f"no patch {patch_id}")
        return Patch.from_bytes(raw, expected_id=patch_id)  # verified against the address it came from

    async def list(self, model: str, version: str) -> list[tuple[str, float]]:
        rows = await self.redis.zrange(f"{self.prefix}patches:{model}:{version}", 0, -1, withscores=True)
        return [(pid.decode() if isinstance(pid, bytes) else pid, score) for pid, score in rows]

    async def active_id(self, model: str, version: str) -> str | None:
        raw = await self.redis.get(f"{self.prefix}active:{model}:{version}")
        return None if raw is None else raw.decode() if isinstance(raw, bytes) else raw

    def runner_now(self, model: str, version: str) -> tuple[bool, PatchRunner | None]:
        """(True, the active patch's runner or None) when this replica has both in memory already, else
        (False, None) and `runner` must be awaited: the hot path's lookup, with no coroutine to run."""
        pid = self._active.get((model, version), "")
        if pid is None:
            return True, None
        runner = self._runners.get(pid) if pid else None
        return (True, runner) if runner is not None else (False, None)

    async def runner(self, model: str, version: str) -> PatchRunner | None:
        """The active patch's runner: from memory; Redis only the first time a version is seen."""
        key = (model, version)
        if key not in self._active:
            self._active[key] = await self.active_id(model, version)
        pid = self._active[key]
        if pid is None:
            return None
        runner = self._runners.get(pid)
        if runner is None:
            runner = self._runners[pid] = PatchRunner(await self.get(pid))
        return runner

    # ------------------------------------------------------------------ keeping replicas in step
    async def refresh(self) -> None:
        """Re-read every pointer this replica has seen (the safety net under pub/sub)."""
        keys = list(self._active)
        if not keys:
            return
        raws = await self.redis.mget([f"{self.prefix}active:{m}:{v}" for m, v in keys])
        for key, raw in zip(keys, raws, strict=True):
            self._active[key] = None if raw is None else raw.decode() if isinstance(raw, bytes) else raw
        live = set(self._active.values())
        for pid in [p for p in self._runners if p not in live]:
            del self._runners[pid]  # inactive patches are not kept in memory

    async def _listen(self) -> None:
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(f"{self.prefix}patch-events")
                while True:
                    # Poll with a short timeout: a blocking read would trip the client's socket_timeout
                    # whenever the channel is quiet.
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is None:
                        continue
                    data = msg["data"].decode() if isinstance(msg["data"], bytes) else msg["data"]
                    model, _, version = data.partition("\x00")
                    if (model, version) in self._active:
                        self._active[(model, version)] = await self.active_id(model, version)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - Redis went away: the periodic re-check covers us
                log.warning("patch-event listener lost Redis (%s); retrying", e)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _recheck(self) -> None:
        while True:
            await asyncio.sleep(self.recheck_s)
            try:
                await self.refresh()
            except Exception as e:  # noqa: BLE001
                log.warning("patch pointer re-check failed: %s", e)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._recheck())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
