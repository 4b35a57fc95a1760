"""CUDA graphs, one helper for every captured computation (the blend front, the recompute layers, decode
and verification steps): capture after a warm-up on a side stream, replay, keep at most `max_graphs`
(least recently used dropped), every graph in one shared memory pool, and an eager fallback once capture
fails (one warning; the caller runs the same computation without the graph).

A captured computation is a function `body(io)` over static tensors (`io`, made once per graph by the
caller, outside the capture): it reads its inputs from them and writes its outputs into them, so no tensor
that outlives a replay lives in the graphs' shared pool (one graph's scratch memory may be another's; a
replay can only clobber what no one holds). Each call fills the inputs in place, replays, and reads the
outputs, which stay valid until the next replay of that graph. Graphs capture tensors by address: the caller's key must name every
buffer the body touches (e.g. the static KV buffer's id), and `drop(pred)` forgets graphs of a freed buffer.
Graphs of one cache never run concurrently (one stream), which is what makes sharing one pool safe.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Captured:
    graph: Any  # torch.cuda.CUDAGraph
    io: Any  # the static inputs and outputs
    body: Any  # kept alive: tensors its closure made before the capture are read by address at every replay

    def replay(self) -> Any:
        self.graph.replay()
        return self.io


class GraphCache:
    """Captured graphs of one model runner, keyed by the caller (see the module docstring)."""

    def __init__(self, model, max_graphs: int = 24):
        self.model = model  # its device is read at each call (a model may be moved after its runner is built)
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[Hashable, Captured] = OrderedDict()
        self.captures = 0
        self.failed: str | None = None
        self._pool = None
        self._side = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def enabled(self) -> bool:
        return self.device.type == "cuda" and self.failed is None

    def get(self, key: Hashable, make_io: Callable[[], Any], make_body: Callable[[], Callable[[Any], None]],
            prepare: Callable[[Any], None] | None = None) -> Captured | None:
        """The graph of `key`, captured on first use (make_io() -> static tensors; prepare(io): make the
        warm-up and capture runs harmless, e.g. point every write at scratch rows); None once capture has
        failed or off CUDA (run the body eagerly instead). make_body() is called only to capture."""
        if not self.enabled:
            return None
        g = self.graphs.get(key)
        if g is None:
            try:
                g = self._capture(make_io, make_body(), prepare)
            except RuntimeError as exc:
                self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                log.warning("CUDA graph capture failed (%s); running eagerly from now on", self.failed)
                return None
            self.graphs[key] = g
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        return g

    def _capture(self, make_io, body, prepare) -> Captured:
        dev = self.device
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._side = torch.cuda.Stream(dev)
        io = make_io()
        if prepare is not None:
            prepare(io)
        side = self._side
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up: allocator, library handles, kernel compilation
            for _ in range(2):
                body(io)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            body(io)
        self.captures += 1
        return Captured(graph, io, body)

    def drop(self, pred: Callable[[Hashable], bool]) -> None:
        for key in [k for k in self.graphs if pred(k)]:
            del self.graphs[key]

    def count(self, kind: str | None = None) -> int:
        """Graphs kept (of one kind: keys are tuples whose first entry names the kind)."""
        return sum(1 for k in self.graphs if kind is None or (isinstance(k, tuple) and k[0] == kind))
