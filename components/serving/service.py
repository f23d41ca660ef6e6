"""The service's moving parts and their lifecycle: slots A (and B), the engine, the batcher, the watcher.

Models load in the background after the port opens (/health answers at once, /ready once every
slot holds a version). The watcher then polls `live_version` every `reload_every_s` seconds and
reloads a slot whose out_dir has a newly promoted version; /admin/reload does the same on demand.
"""
from __future__ import annotations

import asyncio
import logging

from components.serving.batching import DynamicBatcher
from components.serving.engine import Answer, Engine
from components.serving.request_log import RequestLog
from components.serving.schema import Job
from components.serving.settings import ServeSettings
from components.serving.versions import ModelSlot

log = logging.getLogger("sa2crq.serve")
RETRY_S = 1.0   # first load failed (e.g. a promotion half-way): try again this soon, polling or not


class Service:
    def __init__(self, params: dict, settings: ServeSettings):
        self.settings = settings
        self.slots = {"A": ModelSlot(params, settings.out_dir)}
        if settings.ab_out_dir is not None:
            self.slots["B"] = ModelSlot(params, settings.ab_out_dir)
        request_log = RequestLog(settings.request_log) if settings.request_log else None
        self.engine = Engine(params, self.slots, request_log, settings.item_text_chars)
        self.batcher: DynamicBatcher[Job, Answer] = DynamicBatcher(self.engine.run, settings.max_batch,
                                                                    settings.max_wait_ms)
        self._watcher: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return all(slot.current is not None for slot in self.slots.values())

    def versions(self) -> dict[str, str | None]:
        return {name: slot.current.version if slot.current else None for name, slot in self.slots.items()}

    def errors(self) -> dict[str, str]:
        return {name: slot.last_error for name, slot in self.slots.items() if slot.last_error}

    async def start(self) -> None:
        self.batcher.start()
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="version-watcher")

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        await self.batcher.stop()

    async def reload(self, force: bool = False) -> dict[str, dict]:
        """Reload every slot whose live version changed (all with force); a slot that fails keeps its
        version, the others still reload, then the first failure is raised."""
        out, failures = {}, []
        for name, slot in self.slots.items():
            try:
                swapped = await asyncio.to_thread(slot.reload, force)
            except Exception as exc:     # noqa: BLE001 - raised below, after the other slots
                failures.append(exc)
                continue
            if swapped:
                log.info("slot %s now serves %s (%s)", name, slot.current.version, slot.out_dir)
            out[name] = {"version": slot.current.version, "reloaded": swapped}
        if failures:
            raise failures[0]
        return out

    async def _watch(self) -> None:
        every = self.settings.reload_every_s
        while True:
            try:
                await self.reload()
            except Exception as exc:     # noqa: BLE001 - keep serving the loaded version, retry later
                log.warning("reload failed, still serving %s: %s", self.versions(), exc)
            if every <= 0 and self.ready:
                return
            await asyncio.sleep(every if every > 0 and self.ready else RETRY_S)
