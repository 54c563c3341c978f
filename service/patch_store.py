"""Patches in Redis, per model version, with an in-process cache so serving never waits on Redis.

Layout (prefix `fp:`):
- `patch:{id}` -> the patch bytes, written with SET NX (content-addressed: a write never changes it)
- `patches:{model}:{version}` -> sorted set of patch ids made for that version, scored by time
- `active:{model}:{version}` -> the id of the active patch (absent = serve unpatched)
- `rollout:{model}:{version}` -> its rollout stage, JSON (service.rollout.Rollout; absent = `active`),
  written with the pointer in one transaction
- `verdict:{id}` -> the held-out verdict of the job that made the patch (the activation guard reads it)
- channel `patch-events` -> `{model}\\x00{version}` whenever an active pointer changes

Every gateway replica keeps the active pointers it has seen and a `PatchRunner` per patch id. A
pub/sub listener refreshes a pointer when told, and a periodic re-check catches messages that
pub/sub dropped. Patches are verified against their id (their content hash) whenever they are
fetched, and a patch is served only for the model version it is bound to: activation refuses
another version's patch, and so does serving, whatever the pointer in Redis says
(`PatchUnservable`: the request is refused, the patch is never applied).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from patcher.apply import PatchRunner
from patcher.device import DeviceUnavailable
from patcher.patch import Patch, PatchError
from service.errors import ApiError
from service.rollout import Rollout

log = logging.getLogger("fairpatch.service")


class PatchNotFound(LookupError):
    pass


class PatchUnservable(ApiError):
    """The active pointer names a patch that may not be served for this model version: bound to another
    version, unbound, unreadable, or bytes that fail their hash. Requests are refused (409) until an
    operator activates a good patch or deactivates this one."""

    def __init__(self, model: str, version: str, patch_id: str, reason: str) -> None:
        super().__init__(409, f"model '{model}' version '{version}': the active patch {patch_id[:12]} cannot be "
                              f"served ({reason}); activate a patch made for version '{version}' or deactivate "
                              f"this one (POST /v1/models/{model}/versions/{version}/patches/deactivate)")


class PatchStore:
    def __init__(self, redis: Redis, prefix: str = "fp:", recheck_s: float = 5.0, device: str = "cpu") -> None:
        self.redis = redis
        self.device = device  # where weight patches' replacement models run (patcher.device)
        self.prefix = prefix
        self.recheck_s = recheck_s
        self._active: dict[tuple[str, str], str | None] = {}  # (model, version) -> patch id
        self._stage: dict[tuple[str, str], Rollout] = {}  # (model, version) -> its stage, when not plain active
        self._runners: dict[str, PatchRunner] = {}
        # (model, version, patch id) -> why that pointer cannot be served; dropped when the pointer moves
        self._refused: dict[tuple[str, str, str], str] = {}
        self._serving: dict[tuple[str, str], tuple[str, PatchRunner]] = {}  # checked: (model, version) -> runner
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

    async def activate(self, model: str, version: str, patch_id: str, rollout: Rollout | None = None) -> Patch:
        """Point the version at a patch, in a rollout stage (None: plainly active)."""
        patch = await self.get(patch_id)
        patch.check_model(model, version)  # never apply a patch to another model version
        staged = rollout is not None and rollout.stage != "active"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(f"{self.prefix}active:{model}:{version}", patch_id)
            if staged:
                pipe.set(f"{self.prefix}rollout:{model}:{version}", rollout.model_dump_json())
            else:
                pipe.delete(f"{self.prefix}rollout:{model}:{version}")
            await pipe.execute()
        self._set_stage((model, version), rollout if staged else None)
        await self._announce(model, version, patch_id)
        return patch

    async def deactivate(self, model: str, version: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(f"{self.prefix}active:{model}:{version}")
            pipe.delete(f"{self.prefix}rollout:{model}:{version}")
            await pipe.execute()
        self._set_stage((model, version), None)
        await self._announce(model, version, None)

    def _set_stage(self, key: tuple[str, str], rollout: Rollout | None) -> None:
        if rollout is None:
            self._stage.pop(key, None)
        else:
            self._stage[key] = rollout

    def stage_now(self, model: str, version: str) -> Rollout | None:
        """The version's rollout stage as this replica last read it; None = plainly active (the hot path's
        lookup: a dict read)."""
        return self._stage.get((model, version))

    async def rollout(self, model: str, version: str) -> Rollout | None:
        """The stage in Redis: None when no patch is active; stage `active` when it is plainly active."""
        pid, stage = await self._pointer(model, version)
        if pid is None:
            return None
        return stage or Rollout(patch=pid)

    async def _pointer(self, model: str, version: str) -> tuple[str | None, Rollout | None]:
        raw_pid, raw_stage = await self.redis.mget([f"{self.prefix}active:{model}:{version}",
                                                    f"{self.prefix}rollout:{model}:{version}"])
        return _decode(raw_pid), _stage_of(raw_stage, _decode(raw_pid))

    async def set_verdict(self, patch_id: str, verdict: dict) -> None:
        import json

        await self.redis.set(f"{self.prefix}verdict:{patch_id}", json.dumps(verdict))

    async def verdict(self, patch_id: str) -> dict | None:
        import json

        raw = await self.redis.get(f"{self.prefix}verdict:{patch_id}")
        return None if raw is None else json.loads(raw)

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

    async def raw(self, patch_id: str) -> bytes | None:
        """The stored bytes of a patch as they are (None when there is none); callers verify them."""
        return await self.redis.get(f"{self.prefix}patch:{patch_id}")

    async def list(self, model: str, version: str) -> list[tuple[str, float]]:
        rows = await self.redis.zrange(f"{self.prefix}patches:{model}:{version}", 0, -1, withscores=True)
        return [(pid.decode() if isinstance(pid, bytes) else pid, score) for pid, score in rows]

    async def active_id(self, model: str, version: str) -> str | None:
        raw = await self.redis.get(f"{self.prefix}active:{model}:{version}")
        return None if raw is None else raw.decode() if isinstance(raw, bytes) else raw

    def runner_now(self, model: str, version: str) -> tuple[bool, PatchRunner | None]:
        """(True, the active patch's runner or None) when this replica has both in memory already, else
        (False, None) and `runner` must be awaited: the hot path's lookup, with no coroutine to run."""
        key = (model, version)
        pid = self._active.get(key, "")
        if pid is None:
            return True, None
        serving = self._serving.get(key)
        if serving is None or serving[0] != pid:
            return False, None  # `runner` loads the patch and checks its binding
        return True, serving[1]

    async def runner(self, model: str, version: str) -> PatchRunner | None:
        """The active patch's runner: from memory; Redis only the first time a version is seen."""
        key = (model, version)
        try:
            return await self._runner(key, model, version)
        except (RedisError, OSError) as e:
            raise ApiError(503, f"the patch store (Redis) is unavailable ({e}); retry shortly") from None

    async def _runner(self, key: tuple[str, str], model: str, version: str) -> PatchRunner | None:
        if key not in self._active:
            self._active[key], stage = await self._pointer(model, version)
            self._set_stage(key, stage)
        pid = self._active[key]
        if pid is None:
            return None
        reason = self._refused.get((model, version, pid))
        if reason is not None:  # a new exception each time: a re-raised one would keep every request's frames
            raise PatchUnservable(model, version, pid, reason)
        runner = self._runners.get(pid)
        try:
            patch = runner.patch if runner is not None else await self.get(pid)
            bound = patch.manifest.get("model") or {}
            if not bound:
                raise PatchError("it is bound to no model version")
            patch.check_model(model, version)  # never serve a patch made for another model version
        except (PatchError, PatchNotFound) as e:
            self._refused[(model, version, pid)] = str(e)
            refused = PatchUnservable(model, version, pid, str(e))
            log.error("%s", refused.message)
            raise refused from None
        if runner is None:
            try:
                runner = self._runners[pid] = PatchRunner(patch, self.device)
            except DeviceUnavailable as e:  # checked at start; a GPU lost since is the operator's to fix
                self._refused[(model, version, pid)] = str(e)
                refused = PatchUnservable(model, version, pid, str(e))
                log.error("%s", refused.message)
                raise refused from None
        self._serving[key] = (pid, runner)
        return runner

    def forget(self, model: str, version: str) -> None:
        """Drop what this replica keeps for a model version (it was unregistered)."""
        self._active.pop((model, version), None)
        self._stage.pop((model, version), None)
        self._serving.pop((model, version), None)
        self._prune()

    def _prune(self) -> None:
        live = set(self._active.values())
        for pid in [p for p in self._runners if p not in live]:
            del self._runners[pid]  # inactive patches are not kept in memory
        for key in [k for k in self._refused if self._active.get(k[:2]) != k[2]]:
            del self._refused[key]
        for key in [k for k, (pid, _) in self._serving.items() if self._active.get(k) != pid]:
            del self._serving[key]

    # ------------------------------------------------------------------ keeping replicas in step
    async def refresh(self) -> None:
        """Re-read every pointer this replica has seen (the safety net under pub/sub)."""
        keys = list(self._active)
        if not keys:
            return
        raws = await self.redis.mget([f"{self.prefix}{kind}:{m}:{v}" for m, v in keys
                                      for kind in ("active", "rollout")])
        for i, key in enumerate(keys):
            self._active[key] = pid = _decode(raws[2 * i])
            self._set_stage(key, _stage_of(raws[2 * i + 1], pid))
        self._prune()

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
                        pid, stage = await self._pointer(model, version)
                        self._active[(model, version)] = pid
                        self._set_stage((model, version), stage)
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


def _decode(raw: bytes | str | None) -> str | None:
    return raw.decode() if isinstance(raw, bytes) else raw


def _stage_of(raw: bytes | str | None, pid: str | None) -> Rollout | None:
    """The stored stage when it is for the pointed-at patch (a stale one is ignored: plainly active)."""
    if raw is None or pid is None:
        return None
    try:
        stage = Rollout.model_validate_json(raw)
    except ValueError:
        log.error("unreadable rollout stage %r; serving the patch as active", raw)
        return None
    return stage if stage.patch == pid and stage.stage != "active" else None
