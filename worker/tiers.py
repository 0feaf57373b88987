"""The worker's memory tiers above the broker's store: host (weights in pages) and device.

A model climbs two steps, each done once and kept:

- cold -> host (`HostTier.prepare`): ONNX Runtime optimizes the uploaded graph once, at
  its highest level, and saves it with every initializer external; the weights are then
  copied into pages of the host pool (`ext.PagePool`) and the saved graph keeps only
  their names, shapes and an empty placeholder file. This is the expensive step (a full
  session build); it happens when a model first reaches the worker.
- host -> device (`DeviceTier.load`): a runnable session is built from that saved graph
  with optimization off, prepacking off and every initializer passed as an OrtValue over
  the pool's pages (`SessionOptions.add_initializer`, caller-owned memory). ONNX Runtime
  then neither optimizes nor copies: the build takes a millisecond or two where a fresh
  one takes hundreds, and N sessions of one model hold its weights once.

Measured here (ORT 1.32): `add_external_initializers` copies the tensors into the
session (8 ResNet-18 sessions added 325 MB); `add_initializer` does not (0 MB, and
zeroing the pool's pages changes the session's outputs). Loading the saved graph from
bytes fails ORT's external-data path check, so the graph is loaded from its file, whose
external file exists but is empty: ORT reads nothing from it.

Memory is charged as measured: a session's charge is what building it and running it
once at batch 1 added to the process (resident set), measured when the model is
prepared, not the model's file size. Device-tier sessions take their activations from
one arena shared by the process (`shared_arena_options`), so that charge stays small.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ext import Allocation, PagePool
from mtcore.errors import LoadFailed, ModelInvalid, PoolExhausted

log = logging.getLogger("mtserve.worker")
INLINE_BELOW = 1024  # initializers smaller than this stay in the graph (shapes, scalars)
ALIGN = 64  # byte alignment of every tensor inside a page (what ORT's CPU kernels like)
GRAPH_FILE = "graph.onnx"
WEIGHTS_FILE = "weights.bin"  # empty once the weights are in the pool


def resident_bytes() -> int:
    """The process's resident set, from /proc (0 where there is no /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def trim_heap() -> None:
    """Give freed heap back to the OS (glibc's malloc_trim), so the resident set shows
    what is held: building the optimizing session frees hundreds of MB that malloc
    would otherwise keep."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass(frozen=True)
class Place:
    """Where one weight lies: page `page` of allocation `allocation`, at byte `offset`.

    A device copy made page for page (worker.gpu.pools.copy_pages) keeps every place."""

    allocation: int
    page: int
    offset: int


@dataclass(eq=False)
class HostModel:
    """A model in the host tier: its optimized graph on disk and its weights in pages."""

    sha256: str
    graph_path: Path | None  # ORT's optimized graph, initializers external (to an empty
    # file); None for an engine that keeps its own graph (`plan`)
    allocations: list[Allocation]  # pool pages holding the weights
    names: list[str]  # initializer names, in the order of `values`
    values: list[Any]  # onnxruntime.OrtValue over pool memory, one per initializer
    weight_bytes: int  # exact bytes of the weights
    prepare_us: float  # how long cold -> host took (optimize, save, copy into pages)
    session_bytes: int = 0  # measured resident bytes one runnable session adds
    sessions: int = 0  # live sessions built over these pages; evictable only at 0
    arrays: list[np.ndarray] = field(default_factory=list)  # the weights, viewing the pages
    places: list[Place] = field(default_factory=list)  # where each array lies in the pages
    plan: Any = None  # the torch engine's lowered graph (None for ONNX Runtime's)

    def release(self) -> None:
        """Free the pages. The OrtValues and arrays viewing them go first."""
        self.values.clear()
        self.arrays.clear()
        for allocation in self.allocations:
            if not allocation.freed:
                allocation.free()
        self.allocations.clear()


def session_options(threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


_shared_arena = threading.Lock()  # held while the process-wide arena is registered
_arena_registered = False
_run_memory = 0  # the arena's wall in bytes (0: none); set before the first session


def set_run_memory(nbytes: int) -> None:
    """Wall the process-wide activation arena at `nbytes`: a run that asks for more fails
    (its request gets EXEC_FAILED) instead of growing the worker until the OS kills it.
    ONNX Runtime fixes the arena when it is registered, so this must come first."""
    global _run_memory
    with _shared_arena:
        if _arena_registered and nbytes != _run_memory:  # several workers in one process
            log.warning("the run-memory wall stays %d bytes: fixed by the first session",
                        _run_memory)  # fmt: skip
            return
        _run_memory = nbytes


def shared_arena_options(threads: int) -> Any:
    """Options of a device-tier session: activations come from one process-wide arena.

    By default every ONNX Runtime session keeps its own arena, which holds the peak
    activations of its largest run for as long as the session lives: 5 MB per ResNet-18
    session at batch 1, more than the weights it shares once it has run. With one arena
    registered on ORT's environment and `session.use_env_allocators`, runnable copies
    cost only their graph and kernels, and activations are reused across sessions.
    The arena is walled at `set_run_memory`'s bytes: a hostile model that computes a
    huge shape from its input (Expand, Tile, ConstantOfShape) fails that run, alone.
    """
    import onnxruntime as ort

    global _arena_registered
    with _shared_arena:
        if not _arena_registered:
            info = ort.OrtMemoryInfo(
                "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
            )
            config = {"max_mem": _run_memory, "arena_extend_strategy": 1}  # 1: as requested
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(config))
            _arena_registered = True
    options = session_options(threads)
    options.add_session_config_entry("session.use_env_allocators", "1")
    return options


def _optimize(data: bytes, directory: Path, threads: int) -> None:
    """Optimize once at ORT_ENABLE_ALL and save the graph with external initializers."""
    import onnxruntime as ort

    options = session_options(threads)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(directory / GRAPH_FILE)
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", WEIGHTS_FILE
    )
    options.add_session_config_entry(  # smaller ones stay inline: ORT needs shape constants
        "session.optimized_model_external_initializers_min_size_in_bytes", str(INLINE_BELOW)
    )
    try:
        ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelInvalid(
            f"ONNX Runtime cannot load the model: {str(exc).strip()[:400]}"
        ) from None


@dataclass
class _Tensor:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # in the weights file
    nbytes: int


def _external_tensors(graph_path: Path) -> tuple[list[_Tensor], int]:
    """The external initializers a numpy array can hold exactly, and how many others.

    Packed types (INT4, FLOAT4...) are stored in fewer bytes than numpy's view of them
    holds; ORT reads those from its own file, so that file is then kept.
    """
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load(str(graph_path), load_external_data=False)
    tensors, left_to_ort = [], 0
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue  # kept inline in the graph by ORT: it loads those itself
        info = {entry.key: entry.value for entry in init.external_data}
        try:
            dtype = np.dtype(tensor_dtype_to_np_dtype(init.data_type))
        except (KeyError, TypeError, ValueError):
            left_to_ort += 1
            continue
        tensor = _Tensor(
            init.name, dtype, tuple(init.dims), int(info.get("offset", 0)), int(info["length"])
        )
        if math.prod(tensor.shape) * dtype.itemsize != tensor.nbytes or dtype.hasobject:
            left_to_ort += 1
            continue
        tensors.append(tensor)
    return tensors, left_to_ort


def _read_weights(path: Path, tensors: list[_Tensor], arrays: list[np.ndarray]) -> None:
    """Copy each tensor from ORT's weights file into its pages."""
    with open(path, "rb") as f:
        for tensor, array in zip(tensors, arrays, strict=True):
            f.seek(tensor.offset)
            if f.readinto(array.reshape(-1).view(np.uint8)) != tensor.nbytes:
                raise ModelInvalid(f"optimized weights of {tensor.name!r} are truncated")


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def pack(sizes: list[int], page_size: int) -> tuple[list[tuple[int, int]], int, list[int]]:
    """Place tensors in pages, first fit by decreasing size.

    Returns (placement, pages, large): `placement[i]` is (page, offset) for tensors that
    fit in a page (page -1 for the others), `pages` how many shared pages they need, and
    `large` the indices of tensors bigger than a page, which get contiguous runs.
    """
    placement = [(-1, 0)] * len(sizes)
    free: list[int] = []  # bytes left in each shared page
    large = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        need = _aligned(max(sizes[i], 1))
        if need > page_size:
            large.append(i)
            continue
        for page, left in enumerate(free):
            if left >= need:
                placement[i] = (page, page_size - left)
                free[page] -= need
                break
        else:
            placement[i] = (len(free), 0)
            free.append(page_size - need)
    return placement, len(free), large


class HostTier:
    """Prepared models whose weights live in the host pool, least recently used first.

    Owned by the loader thread, except `describe` (read-only, any thread).
    """

    def __init__(self, pool: PagePool, workdir: Path, threads: int = 1) -> None:
        self.pool = pool
        self.workdir = workdir  # one folder per prepared model
        self.threads = threads  # ONNX Runtime threads for the one-time optimization
        self.models: OrderedDict[str, HostModel] = OrderedDict()
        self.prepared = 0  # cold -> host steps done (a model prepared twice counts twice)
        self.evicted = 0  # host models dropped for room

    def get(self, sha: str) -> HostModel | None:
        model = self.models.get(sha)
        if model is not None:
            self.models.move_to_end(sha)
        return model

    def prepare(self, sha: str, data: bytes) -> HostModel:
        """Cold -> host: optimize once, then move the weights into pool pages."""
        existing = self.get(sha)
        if existing is not None:
            return existing
        start = time.perf_counter()
        directory = self.workdir / sha
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        try:
            _optimize(data, directory, self.threads)
            model = self._fill(sha, directory)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        trim_heap()
        return self._keep(model, start)

    def _keep(self, model: HostModel, start: float) -> HostModel:
        """A model just prepared (since `start`) joins the tier."""
        model.prepare_us = (time.perf_counter() - start) * 1e6
        self.models[model.sha256] = model
        self.prepared += 1
        return model

    def _fill(self, sha: str, directory: Path) -> HostModel:
        import onnxruntime as ort

        graph_path = directory / GRAPH_FILE
        tensors, left_to_ort = _external_tensors(graph_path)

        def fill(arrays: list[np.ndarray]) -> list[Any]:
            if tensors:  # none when every initializer is small enough to stay inline
                _read_weights(directory / WEIGHTS_FILE, tensors, arrays)
            return [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]

        allocations, places, arrays, values = self._in_pages(tensors, fill)
        if tensors and not left_to_ort:  # ORT checks that the file exists, reads nothing
            os.truncate(directory / WEIGHTS_FILE, 0)
        return HostModel(
            sha,
            graph_path,
            allocations,
            [t.name for t in tensors],
            values,
            sum(t.nbytes for t in tensors),
            0.0,
            arrays=arrays,
            places=places,
        )

    def adopt(self, sha: str, plan: Any, weights: list[np.ndarray], start: float) -> HostModel:
        """Cold -> host for an engine that parsed the model itself (the torch engine):
        copy its weight arrays into pages. `start` is when preparing began."""
        existing = self.get(sha)
        if existing is not None:
            return existing
        tensors = [
            _Tensor(f"w{i}", w.dtype, tuple(w.shape), 0, w.nbytes) for i, w in enumerate(weights)
        ]

        def fill(arrays: list[np.ndarray]) -> None:
            for array, weight in zip(arrays, weights, strict=True):
                array[...] = weight

        allocations, places, arrays, _ = self._in_pages(tensors, fill)
        model = HostModel(
            sha, None, allocations, [], [], sum(t.nbytes for t in tensors), 0.0,
            arrays=arrays, places=places, plan=plan,
        )  # fmt: skip
        return self._keep(model, start)

    def _in_pages(
        self, tensors: list[_Tensor], fill: Callable[[list[np.ndarray]], Any]
    ) -> tuple[list[Allocation], list[Place], list[np.ndarray], Any]:
        """Place the tensors in pages and `fill` their arrays (returning what it makes);
        if either fails, every page taken goes back to the pool."""
        allocations: list[Allocation] = []
        places: list[Place] = []
        try:
            arrays = self._place(tensors, allocations, places)
            made = fill(arrays)
        except BaseException:
            arrays = made = None  # the views go before their pages
            for allocation in allocations:
                allocation.free()
            raise
        return allocations, places, arrays, made

    def _place(
        self, tensors: list[_Tensor], allocations: list[Allocation], places: list[Place]
    ) -> list[np.ndarray]:
        """Allocate pages for every tensor (evicting idle models if needed), appending
        them to `allocations` as they are made (the caller frees them on failure);
        return an array view over its place for each tensor, and append the place."""
        page_size = self.pool.page_size
        placement, pages, large = pack([t.nbytes for t in tensors], page_size)
        shared = self._alloc(pages * page_size, contiguous=False) if pages else None
        if shared is not None:
            allocations.append(shared)
        runs = {}
        for i in large:
            runs[i] = len(allocations)
            allocations.append(self._alloc(tensors[i].nbytes, contiguous=True))
        arrays = []
        for i, tensor in enumerate(tensors):
            if i in runs:
                buffer, offset = allocations[runs[i]].view(), 0
                places.append(Place(runs[i], 0, 0))
            else:
                page, offset = placement[i]
                buffer = shared.page(page)
                places.append(Place(0, page, offset))
            count = tensor.nbytes // tensor.dtype.itemsize
            flat = np.frombuffer(buffer, tensor.dtype, count=count, offset=offset)
            arrays.append(flat.reshape(tensor.shape))
        return arrays

    def _alloc(self, nbytes: int, contiguous: bool) -> Allocation:
        while True:
            try:
                return self.pool.alloc(nbytes, contiguous=contiguous)
            except PoolExhausted:
                if not self._evict_one():
                    raise

    def _evict_one(self) -> bool:
        """Drop the least recently used model no session is built on; False if none."""
        for sha, model in self.models.items():
            if model.sessions == 0:
                self.drop(sha)
                self.evicted += 1
                return True
        return False

    def drop(self, sha: str) -> bool:
        model = self.models.get(sha)
        if model is None or model.sessions:
            return False
        del self.models[sha]
        model.release()
        if model.graph_path is not None:
            shutil.rmtree(model.graph_path.parent, ignore_errors=True)
        return True

    def close(self) -> None:
        for sha in list(self.models):
            model = self.models.pop(sha)
            model.release()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def describe(self) -> dict[str, Any]:
        return {
            "models": list(self.models),
            "used": self.pool.bytes_reserved,
            "weights": self.pool.bytes_requested,
            "free": self.pool.pages_free * self.pool.page_size,
        }


@dataclass(eq=False)
class Runnable:
    """A session in the device tier and the host model whose pages it reads."""

    host: HostModel
    live: Any  # worker.onnx_backend.LiveModel
    charge: int  # bytes charged against the device budget (measured)
    in_use: int = 0  # exec runs holding it now
    dropped: bool = False  # removed from the tier; released when the last run ends
    release: Callable[[], None] = lambda: None  # frees what the copy owns (device pages)

    def _released(self) -> None:
        self.host.sessions -= 1
        self.release()


@dataclass
class DeviceTier:
    """Runnable sessions under a byte budget, least recently used first.

    The loader adds and drops; exec threads check a model out for a run and back in, so
    a session being run is never released under it. One lock guards the map and the
    counts; no model runs while holding it.
    """

    budget: int
    busy: Callable[[str], bool] = lambda sha: False  # INFERs of it are queued: keep it
    models: OrderedDict[str, Runnable] = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def checkout(self, sha: str) -> Runnable | None:
        with self.lock:
            runnable = self.models.get(sha)
            if runnable is not None:
                self.models.move_to_end(sha)
                runnable.in_use += 1
            return runnable

    def checkin(self, runnable: Runnable) -> None:
        with self.lock:
            runnable.in_use -= 1
            if runnable.dropped and runnable.in_use == 0:
                runnable._released()

    def peek(self, sha: str) -> Runnable | None:
        return self.models.get(sha)

    def used(self) -> int:
        return sum(r.charge for r in self.models.values())

    def make_room(self, charge: int) -> list[str]:
        """Evict least recently used idle sessions until `charge` bytes are free; nothing
        is evicted when even that would not make room (LoadFailed). A GPU engine asks
        before its copy: the device pool must have the pages free when it allocates."""
        with self.lock:
            return self._make_room_locked(charge)

    def add(self, runnable: Runnable) -> list[str]:
        """Add, evicting as `make_room` does."""
        with self.lock:
            victims = self._make_room_locked(runnable.charge)
            runnable.host.sessions += 1
            self.models[runnable.host.sha256] = runnable
        return victims

    def _make_room_locked(self, charge: int) -> list[str]:
        free = self.budget - self.used()
        victims = []
        for sha, other in self.models.items():
            if free >= charge:
                break
            if other.in_use == 0 and not self.busy(sha):
                victims.append(sha)
                free += other.charge
        if free < charge:
            raise LoadFailed(
                f"the model's session needs {charge} bytes; the device budget is"
                f" {self.budget}, and sessions in use or with work queued hold"
                f" {self.budget - free}"
            )
        for sha in victims:
            self._drop_locked(sha)
        return victims

    def drop(self, sha: str) -> bool:
        with self.lock:
            return self._drop_locked(sha)

    def _drop_locked(self, sha: str) -> bool:
        runnable = self.models.pop(sha, None)
        if runnable is None:
            return False
        runnable.dropped = True
        if runnable.in_use == 0:
            runnable._released()
        return True

    def clear(self) -> None:
        with self.lock:
            for sha in list(self.models):
                self._drop_locked(sha)

    def describe(self) -> dict[str, Any]:
        with self.lock:
            return {
                "models": list(self.models),
                "used": self.used(),
                "free": max(0, self.budget - self.used()),
            }
