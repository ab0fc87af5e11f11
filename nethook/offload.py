"""Run a loop's consumers in a worker process, so their CPU work overlaps the next batch.

In one Python process, consumers (statistics updates, recorders) and the code that
makes the next batch (rendering images, which is pure Python) take turns on one
interpreter lock, so a second core sits idle. :class:`Offload` forks a worker
process that holds the consumers. A batch's tensors (activations, images, labels)
are copied into one of a few slots of shared memory (allocated once, like a ring
buffer), which the consumers read in place, so nothing large is pickled or copied
again and no shared memory is made per batch; only the batch's structure and small
values travel by pickle. The slot is refilled once the consumers return, so a
consumer must copy what it keeps of a batch's tensors (as with any reused buffer). At most ``depth`` batches are in
flight, which bounds the memory used. The worker's consumer states come back for checkpoints
(:meth:`Offload.sync`) and at the end (:meth:`Offload.finish`), into the caller's
own consumer objects, so after the loop they hold what they would have held had
they run in the caller.

For CPU tensors and consumers whose results live in their ``state_dict`` or in
files they write: anything else a consumer changes (a list in the caller, say)
changes only in the worker.

Where the work itself splits (each process rendering, running the model and feeding
its own consumers for every n-th batch), :func:`in_parallel` runs the parts in
forked processes (:class:`Forked`) and returns their results, such as consumer
states to merge; nothing large crosses between the processes. Dissection uses that
on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pickle
import queue
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.multiprocessing as mp

_POLL = 0.5  # seconds between checks that the worker is still alive


class OffloadError(RuntimeError):
    """The worker process died, or a consumer there raised an exception that cannot be
    sent back (its traceback is in the message; others are raised as they are)."""


class Offload:
    """Feed ``consumers`` (``{name: consumer}``) in a forked worker process.

    ``starts[name]`` is the first batch number each consumer takes (a resumed run
    skips what a consumer has already seen). Call the object with each batch, then
    :meth:`finish`.
    """

    def __init__(
        self, consumers: Mapping[str, Any], starts: Mapping[str, int], depth: int = 2
    ) -> None:
        self.consumers = dict(consumers)
        ctx = mp.get_context("fork")
        self.inbox = ctx.Queue(maxsize=depth)
        self.outbox = ctx.Queue()
        self.free = ctx.Queue()  # slots the worker has copied out
        self.depth = depth
        self.slots: list[dict[str, torch.Tensor]] | None = None
        self.process = ctx.Process(
            target=_serve,
            args=(self.consumers, dict(starts), self.inbox, self.outbox, self.free),
            name="nethook-offload",
            daemon=True,
        )
        self.process.start()

    def __call__(self, batch: Any) -> None:
        """Send ``batch`` to the worker (waits while ``depth`` batches are in flight)."""
        skeleton, tensors = _split(batch)
        for t in tensors.values():
            if t.device.type != "cpu":
                raise ValueError(
                    f"Offload sends CPU tensors to its worker process, got one on {t.device}"
                )
        self._check()
        if self.slots is None:
            self.slots = [
                {key: torch.empty_like(t).share_memory_() for key, t in tensors.items()}
                for _ in range(self.depth + 1)
            ]
            self._put(("slots", self.slots))
            for slot in range(len(self.slots)):
                self.free.put(slot)
        slot = self._get(self.free, raw=True)
        sizes, rest = {}, {}
        for key, t in tensors.items():
            room = self.slots[slot].get(key)
            fits = room is not None and room.dtype == t.dtype and room.shape[1:] == t.shape[1:]
            if fits and t.ndim and len(t) <= len(room):
                room[: len(t)].copy_(t)
                sizes[key] = len(t)
            else:  # a shape the slots were not made for: sent as it is
                rest[key] = t
        self._put(("batch", (slot, sizes, rest, skeleton)))

    def sync(self) -> None:
        """Load the worker's consumer states into the caller's consumers."""
        self._put(("state", None))
        self._load(self._get())

    def finish(self, ok: bool = True) -> None:
        """Close the consumers in the worker and load their final states (``ok``), or
        stop the worker and drop what it held (after a failure in the caller)."""
        try:
            if ok:
                self._put(("close", None))
                self._load(self._get())
            else:
                self._put(("abort", None), wait=False)
        finally:
            self.process.join(timeout=10 if ok else 2)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join()
            for box in (self.inbox, self.outbox, self.free):
                box.cancel_join_thread()  # what the worker left unread must not block exit
                box.close()

    def _load(self, states: dict[str, Any]) -> None:
        for name, state in states.items():
            self.consumers[name].load_state_dict(state)

    def _put(self, message: tuple, wait: bool = True) -> None:
        while True:
            try:
                self.inbox.put(message, timeout=_POLL)
                return
            except queue.Full:
                if not wait:
                    return
                self._check()

    def _get(self, box=None, raw: bool = False) -> Any:
        """The next message of ``box`` (default: the worker's replies), waiting."""
        while True:
            try:
                message = (box or self.outbox).get(timeout=_POLL)
            except queue.Empty:
                if box is None:
                    self._alive()
                else:
                    self._check()
                continue
            if raw:
                return message
            kind, payload = message
            if kind == "error":
                _raise(payload)
            return payload

    def _check(self) -> None:
        """Raise a consumer's error from the worker, or the worker's death."""
        try:
            kind, payload = self.outbox.get_nowait()
        except queue.Empty:
            pass
        else:
            if kind == "error":
                _raise(payload)
            raise OffloadError(f"unexpected message {kind!r} from the worker process")
        self._alive()

    def _alive(self) -> None:
        if not self.process.is_alive():
            raise OffloadError(
                f"the worker process of the consumers died (exit code {self.process.exitcode})"
            )


class Forked:
    """``fn()`` running in a forked process: :meth:`result` waits for it, :meth:`cancel`
    stops it.

    For work that splits into independent halves (each process reads its own part of
    a record from disk): the caller does one half while the child does the other.
    The result comes back pickled; an exception in the child is raised by
    :meth:`result`, with the child's traceback as a note.
    """

    def __init__(self, fn: Callable[[], Any], threads: int = 1) -> None:
        ctx = mp.get_context("fork")
        self._receive, send = ctx.Pipe(duplex=False)

        def child() -> None:
            torch.set_num_threads(threads)
            try:
                send.send(("ok", fn()))
            except BaseException as exc:
                send.send(("error", _failure(exc, "the forked call", "forked process")))

        self.process = ctx.Process(target=child, name="nethook-forked", daemon=True)
        self.process.start()
        send.close()

    def result(self) -> Any:
        """Wait for ``fn()`` and return what it returned (or raise what it raised)."""
        try:
            while not self._receive.poll(_POLL):
                if not self.process.is_alive() and not self._receive.poll(0):
                    raise OffloadError(
                        f"the forked process died (exit code {self.process.exitcode})"
                    )
            kind, payload = self._receive.recv()
        except EOFError:  # the child closed the pipe without a word: it died
            self.process.join()
            raise OffloadError(
                f"the forked process died (exit code {self.process.exitcode})"
            ) from None
        finally:
            self.cancel()
        if kind == "error":
            _raise(payload)
        return payload

    def cancel(self) -> None:
        """Stop the child (if it still runs) and close the pipe."""
        self._receive.close()
        self.process.join(timeout=0 if self.process.exitcode is None else 10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()


def in_parallel(fn: Callable[[int], Any], parts: int) -> list[Any]:
    """``[fn(0), fn(1), ..., fn(parts - 1)]``, each part but the first in a forked process.

    For CPU work that splits into independent parts (a run's batches taken in turns,
    each part writing its own files and returning its consumers' states): the
    processes share the cores' torch threads (one each on as many cores as parts),
    so no process's threads contend with another's. This process runs part 0; if
    it fails, the others are stopped. Results come back pickled.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if parts == 1:
        return [fn(0)]
    threads = torch.get_num_threads()
    each = max(1, cpu_cores() // parts)
    others = [Forked(functools.partial(fn, part), each) for part in range(1, parts)]
    torch.set_num_threads(each)
    try:
        mine = fn(0)
        return [mine, *(other.result() for other in others)]
    except BaseException:
        for other in others:
            other.cancel()
        raise
    finally:
        torch.set_num_threads(threads)


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "process_cpu_count"):  # Python 3.13
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _serve(consumers: dict[str, Any], starts: dict[str, int], inbox, outbox, free) -> None:
    """The worker: feed batches to the consumers in order; answer state requests."""
    torch.set_num_threads(1)  # the caller's process runs the model on the other cores
    slots: list[dict[str, torch.Tensor]] = []
    try:
        while True:
            kind, payload = inbox.get()
            if kind == "slots":
                slots = payload
            elif kind == "batch":
                slot, sizes, rest, skeleton = payload
                tensors = {key: slots[slot][key][:n] for key, n in sizes.items()}
                batch = _join(skeleton, {**tensors, **rest})
                for name, c in consumers.items():
                    if batch.number >= starts[name]:
                        c(batch)
                free.put(slot)  # the consumers are done with it: the caller may refill it
            elif kind == "state":
                outbox.put(("state", _states(consumers)))
            elif kind == "close":
                for c in consumers.values():
                    if hasattr(c, "close"):
                        c.close()
                outbox.put(("state", _states(consumers)))
                return
            else:
                for c in consumers.values():
                    if hasattr(c, "abort"):
                        c.abort()
                return
    except BaseException as exc:  # reported to the caller, which raises it
        outbox.put(("error", _failure(exc, "a consumer", "worker process")))


def _failure(exc: BaseException, what: str, where: str) -> tuple[BaseException, str]:
    """The exception being handled, ready to send: itself if it pickles (else an
    :class:`OffloadError` that says what failed), and its traceback as text."""
    text = f"in the {where}:\n" + traceback.format_exc()
    try:
        pickle.dumps(exc)
    except Exception:
        exc = OffloadError(f"{what} failed {text}")
    return exc, text


def _raise(payload: tuple[BaseException, str]) -> None:
    """Raise a worker's exception in the caller, with the worker's traceback as a note."""
    exc, text = payload
    exc.add_note(text)
    raise exc


def _states(consumers: dict[str, Any]) -> dict[str, Any]:
    return {name: c.state_dict() for name, c in consumers.items() if hasattr(c, "state_dict")}


def _split(tree: Any, key: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """``tree`` (a batch: dataclass, dicts, lists) with its tensors taken out.

    Returns the skeleton, where each tensor is replaced by a :class:`_Hole` naming it,
    and the tensors by name (their path in the tree, stable from batch to batch).
    """
    if isinstance(tree, torch.Tensor):
        return _Hole(key), {key: tree}
    parts: dict[str, torch.Tensor] = {}
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        fields = {}
        for f in dataclasses.fields(tree):
            fields[f.name], found = _split(getattr(tree, f.name), f"{key}/{f.name}")
            parts.update(found)
        return dataclasses.replace(tree, **fields), parts
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out[k], found = _split(v, f"{key}/{k}")
            parts.update(found)
        return out, parts
    if isinstance(tree, list | tuple):
        items = []
        for i, v in enumerate(tree):
            item, found = _split(v, f"{key}/{i}")
            items.append(item)
            parts.update(found)
        return type(tree)(items), parts
    return tree, parts


def _join(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Undo :func:`_split`: put the tensors back into their holes."""
    if isinstance(tree, _Hole):
        return tensors[tree.key]
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        joined = {f.name: _join(getattr(tree, f.name), tensors) for f in dataclasses.fields(tree)}
        return dataclasses.replace(tree, **joined)
    if isinstance(tree, Mapping):
        return {k: _join(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_join(v, tensors) for v in tree)
    return tree


@dataclasses.dataclass
class _Hole:
    """Where a tensor of a batch was (its name in the slots)."""

    key: str
