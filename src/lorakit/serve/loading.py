"""The engine's adapter life cycle, on its thread: starting reads on the store's worker,
attaching what was read between decoding steps (first evicting least recently used idle adapters
past the store's limits), evicting and unloading. A part of :class:`~lorakit.serve.engine.Engine`
(its base class); it uses the engine's model, store, rows and requests."""

from __future__ import annotations

import logging
import time

from ..errors import LorakitError
from ..model import adapter_parameters, delete_adapter, list_adapters, lora_layers
from .adapter_bytes import adapter_itemsize, file_bytes, stack_bytes, stack_shapes
from .store import Entry

log = logging.getLogger("lorakit.serve")


class AdapterLoading:
    """Adapters in and out of the engine's model (see the module docstring)."""

    def _read_done(self) -> list[Entry]:
        with self.store.lock:
            return [
                e
                for e in self.store.entries.values()
                if e.state == "loading" and e.future is not None and e.future.done()
            ]

    def _attach_ready(self) -> None:
        for request in list(self.waiting):
            entry = request.entry
            if entry is not None and entry.state in ("on disk", "failed") and entry.future is None:
                self.start_load_of(entry)
        for entry in self._read_done():  # those requests wait for, and those an admin loads
            self._attach(entry)

    def start_load_of(self, entry: Entry) -> None:
        self.store.start_load(entry, self._read)
        if entry.future is not None:
            entry.future.add_done_callback(self.wake)

    def _read(self, entry: Entry):
        """On the store's worker: the files read and checked, and the adapter's own tokenizer."""
        from ..io.adapter import read_checked

        file = read_checked(entry.path, allow_bin=self.store.allow_bin)
        tokenizer = entry.tokenizer  # read already when its first request was tokenized
        if tokenizer is None and self.store.tokenizer_files(entry.path):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(entry.path))
        vocab = self.model.get_input_embeddings().weight.shape[0]
        if tokenizer is not None and len(tokenizer) > vocab:
            raise LorakitError(
                f"{entry.path}: its tokenizer has {len(tokenizer)} tokens, more than the "
                f"base model's {vocab} embeddings"
            )
        return file, tokenizer

    def _attach(self, entry: Entry) -> None:
        from ..io.adapter import attach_adapter

        future = entry.future
        try:
            file, tokenizer = future.result()
        except Exception as exc:  # noqa: BLE001 - any failure of a file is the adapter's error
            self.store.fail(entry, f"adapter {entry.name!r} could not be loaded: {exc}")
            log.warning("adapter %s failed to load: %s", entry.name, exc)
            return
        entry.bytes = file_bytes(self.model, file)
        entry.stacked = stack_shapes(file, adapter_itemsize(self.model))
        if not self._make_room(entry):
            return  # too large (failed), or the adapters in the way are in use: it waits
        self._close_rows()  # the stacked adapters change
        try:
            self.model = attach_adapter(self.model, file, entry.name)
        except Exception as exc:  # noqa: BLE001
            self.store.fail(entry, f"adapter {entry.name!r} could not be loaded: {exc}")
            log.warning("adapter %s failed to load: %s", entry.name, exc)
            return
        self._adapters_changed()
        measured = sum(
            p.numel() * p.element_size() for p in adapter_parameters(self.model, entry.name)
        )
        with self.store.lock:
            entry.state, entry.tokenizer, entry.future = "ready", tokenizer, None
            entry.bytes = measured
            entry.last_used = time.monotonic()
            self.store.loads += 1
        log.info("adapter %s loaded from %s (%d bytes)", entry.name, entry.path, measured)

    def _make_room(self, entry: Entry) -> bool:
        """Evict least recently used idle adapters until ``entry`` fits both limits; False if
        it must wait, or can never fit (then it fails, and its requests with it)."""
        message = self.store.too_large(entry)
        if message is not None:
            self.store.fail(entry, message)
            log.warning("%s", message)
            return False
        while True:
            verdict, victim = self.store.room_for(entry)
            if verdict != "evict":
                return verdict == "fits"
            self._evict(victim)

    def _adapters_changed(self) -> None:
        """The adapters in memory changed: the layers' stacks of all adapters (kept for mixed
        batches of many adapters) are for the old set, so they are freed now rather than at
        their next use; the list of LoRA layers is taken again for ``stack_bytes``."""
        self.lora_layers = [layer for _, layer in lora_layers(self.model)]
        for layer in self.lora_layers:
            layer._stack_cache = None

    @property
    def stack_bytes(self) -> int:
        return stack_bytes(self.lora_layers)

    def _evict(self, entry: Entry) -> None:
        self._close_rows()
        if entry.name in list_adapters(self.model):
            self.model = delete_adapter(self.model, entry.name)
        self._adapters_changed()
        with self.store.lock:
            entry.state = "on disk"  # its tokenizer stays: the files are read again, not it
            self.store.evictions += 1
        log.info("adapter %s evicted", entry.name)

    def unload(self, entry: Entry) -> None:
        """Take ``entry`` out of memory once no running row uses it (runs on the engine's
        thread, through ``call``); requests still waiting for it fail with a 404."""
        self.unloading.append(entry)
        for request in [r for r in self.waiting if r.entry is entry]:
            self.waiting.remove(request)
            self._error(request, 404, f"the adapter {entry.name!r} was unloaded")

    def _unload_idle(self) -> None:
        for entry in list(self.unloading):
            if not any(j.request.entry is entry for j in self.running):
                self.unloading.remove(entry)
                if entry.state == "ready":
                    self._evict(entry)
