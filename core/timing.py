"""Per-call attention times, measured only when asked (verbose): nothing of this runs otherwise.

On a GPU each timed call records two CUDA events on the current stream, without a device sync; the times are
read once, when the run ends. On the CPU calls are synchronous and ``time.perf_counter`` is exact enough.
"""

from __future__ import annotations

import time

import torch


class CallTimer:
    """Start/stop marks around attention calls; :meth:`resolve` turns them into (key..., milliseconds)."""

    def __init__(self):
        self._marks: list = []
        self._spare = None  # a start mark of a call that was not kept, reused by the next call

    def reset(self) -> None:
        self._marks.clear()
        self._spare = None

    def start(self, device: torch.device):
        if device.type != "cuda":
            return time.perf_counter()
        if self._spare is not None and self._spare[0] == device:
            event = self._spare[1]
        else:
            event = torch.cuda.Event(enable_timing=True)
        self._spare = None
        event.record(torch.cuda.current_stream(device))
        return device, event

    def stop(self, mark, key: tuple) -> None:
        if isinstance(mark, tuple):
            device, start = mark
            end = torch.cuda.Event(enable_timing=True)
            end.record(torch.cuda.current_stream(device))
            self._marks.append((key, start, end))
        else:
            self._marks.append((key, mark, time.perf_counter()))

    def discard(self, mark) -> None:
        """The call was not one to time (cross-attention...): its start event serves the next call."""
        self._spare = mark if isinstance(mark, tuple) else None

    def resolve(self) -> list[tuple]:
        """[(*key, milliseconds)] in call order; syncs the GPU once (at the end of a run)."""
        out = []
        for key, start, end in self._marks:
            if isinstance(end, torch.cuda.Event):
                end.synchronize()  # waits once: the later events of a stream are then done too
                ms = start.elapsed_time(end)
            else:
                ms = (end - start) * 1000.0
            out.append((*key, float(ms)))
        self.reset()
        return out


def timed_override(session, override, context_key: str):
    """Wrap an ``optimized_attention_override``: time each video self-attention call (those the session books,
    sparse or dense, in the call's forward context under ``context_key``), keyed (step, layer, density). Installed
    only when the session has a timer (verbose)."""
    timer: CallTimer = session.timer

    def timed(func, *args, **kwargs):
        q = args[0] if args else None
        ctx = (kwargs.get("transformer_options") or {}).get(context_key)
        if not isinstance(q, torch.Tensor) or ctx is None:
            return override(func, *args, **kwargs)
        ctx.last_call = None
        mark = timer.start(q.device)
        out = override(func, *args, **kwargs)
        if ctx.last_call is None:
            timer.discard(mark)
        else:
            timer.stop(mark, ctx.last_call)
        return out

    return timed
