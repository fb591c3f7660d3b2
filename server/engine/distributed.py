"""Tensor parallelism in the engine (`--tensor-parallel-size N`): one process per rank.

Rank 0 is the server's own process: it loads its shard, schedules, samples and runs the API, as
with one device. Ranks 1..N-1 are worker processes (`multiprocessing` spawn) that load their
shards (`model.parallel`), hold their own KV caches over their KV heads and run every step that
rank 0 runs, on the same inputs, so that the forward pass's collectives pair up.

Process groups: the default group runs the model's collectives (NCCL on CUDA, gloo on CPU) with a
timeout (COLLECTIVE_TIMEOUT), so a rank that stops answering fails the others instead of hanging
them. A second, gloo group carries each step's header from rank 0: workers wait there for the
next step for as long as the server is idle (IDLE_TIMEOUT).

A step reaches the workers as two broadcasts of tensors, never as pickled objects: the header
(what kind of step, its sizes and the query length of each sequence; host tensor, gloo) and one
int64 payload with the step's inputs (token ids, positions, cache slots, block tables, context
lengths, query starts, logits rows), on the device under NCCL and so ordered on its stream after
rank 0 resolved tokens that the step before sampled on the device (async scheduling). A decode step
that rank 0 replays from a CUDA graph replays on each worker from that worker's graph of the same
batch size, captured at the same point of startup with the all-reduces inside.

Faults: rank 0 watches its workers (`_Watch`): a worker that exits, or that reports an exception
(each sends its error as one line before exiting), makes the engine dead (`/health` answers 503,
running streams end with an error), then the server exits with a message naming the rank. During
startup the first error of any rank is the one line the user sees. Workers ignore SIGINT (the
terminal sends it to every process of the group; rank 0 decides) and exit when rank 0's end of
their pipe closes, which also happens when rank 0 is killed, so no worker outlives the server.
"""

import atexit
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from multiprocessing import connection
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.batch import ForwardBatch
from model.config import load_config
from model.load import load_model, resolve_device
from model.parallel import Collectives, shard_of
from model.qwen3 import Qwen3Model
from server.engine.config import EngineConfig, resolve_config
from server.engine.cuda_graph import DecodeGraphRunner, StaticInputs, graph_buckets, graphs_unavailable

logger = logging.getLogger("nanoserve.engine")

COLLECTIVE_TIMEOUT = timedelta(seconds=60)  # a step's collectives; first steps may compile kernels
IDLE_TIMEOUT = timedelta(days=365)  # workers wait this long for the next step: an idle server is not a fault
STARTUP_TIMEOUT = timedelta(minutes=10)  # for every rank to join, loading included
FAILURE_GRACE_S = 1.0  # between a worker's failure and the exit: running streams get their error event

# The header: [kind, tokens, sequences, block-table width, logits rows, graph bucket, query lens...]
STOP, EAGER, GRAPH = 0, 1, 2
HEADER_FIELDS = 6

_header_group: dist.ProcessGroup | None = None  # this process's gloo group for step headers
_stop_server = None  # rank 0: ends the server, given why (`TensorParallelWorkers._fail`)


def _init_process_groups(rank: int, size: int, store: dist.Store, device: torch.device) -> None:
    global _header_group
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)
    _header_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def collectives(size: int) -> Collectives:
    """The model's collectives over the default process group of `size` ranks."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the name of torch >= 2.13

    def all_reduce(tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor)

    def all_gather(tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.new_empty(size * tensor.shape[0], *tensor.shape[1:])  # the ranks' tensors stacked along dim 0
        gather(out, tensor)
        return out.view(size, *tensor.shape)

    return Collectives(all_reduce, all_gather)


def load_rank(model_dir: Path, device: str, dtype: str, config: EngineConfig, rank: int) -> tuple[Qwen3Model, EngineConfig]:
    """This rank's shard and the engine sizes that every rank agrees on (the KV cache is as large
    as the rank with the least memory holds). Every rank calls it at the same point."""
    size = config.tensor_parallel_size
    model = load_model(model_dir, device, dtype, block_size=config.block_size, rank=rank, world_size=size,
                       collectives=collectives(size), progress=None if rank == 0 else False)
    resolved = resolve_config(config, model)
    blocks = torch.tensor([resolved.num_kv_blocks], dtype=torch.int64, device=model.device)
    dist.all_reduce(blocks, op=dist.ReduceOp.MIN)
    if blocks.item() != resolved.num_kv_blocks:
        resolved = resolve_config(replace(config, num_kv_blocks=blocks.item()), model)
    if model.device.type == "cpu":
        plan = model.plan_cpu_ops(resolved.max_num_seqs, resolved.max_model_len, resolved.quantization).describe()
        if rank == 0:
            logger.info(plan)
    return model, resolved


# ---- the step, from rank 0 to the workers ----


class StepSender:
    """Rank 0's side of every step: header and inputs to the workers, before rank 0's own forward."""

    def __init__(self, max_num_seqs: int):
        self._header = torch.zeros(HEADER_FIELDS + max_num_seqs, dtype=torch.int64)
        self._header_np = self._header.numpy()

    def send(self, batch: ForwardBatch) -> None:
        """An eager step over `batch`."""
        seqs = len(batch.query_lens)
        self._send_header(EAGER, batch.token_ids.shape[0], seqs, batch.block_tables.shape[1],
                          batch.logits_indices.shape[0], 0)
        self._header_np[HEADER_FIELDS : HEADER_FIELDS + seqs] = batch.query_lens
        dist.broadcast(self._header, 0, group=_header_group)
        dist.broadcast(_pack(batch.token_ids, batch.positions, batch.slot_mapping, batch.block_tables,
                             batch.context_lens, batch.query_start_loc, batch.logits_indices), 0)

    def send_graph(self, bucket: int, inputs: StaticInputs) -> None:
        """A decode step of `bucket` rows (padding included) that replays its graph."""
        self._send_header(GRAPH, bucket, bucket, inputs.table_width, 0, bucket)
        dist.broadcast(self._header, 0, group=_header_group)
        dist.broadcast(_pack(inputs.token_ids[:bucket], inputs.positions[:bucket], inputs.slot_mapping[:bucket],
                             inputs.block_tables[: bucket * inputs.table_width], inputs.context_lens[:bucket]), 0)

    def abandon(self, err: Exception) -> None:
        """Rank 0 failed inside a step whose collectives the workers are in: the ranks cannot be
        brought back in step, so the server stops, as when a worker fails."""
        if _stop_server is not None:
            _stop_server(f"tensor-parallel rank 0 failed inside a step: {_one_line(err)}")

    def _send_header(self, kind: int, tokens: int, seqs: int, width: int, logits_rows: int, bucket: int) -> None:
        self._header_np[:HEADER_FIELDS] = (kind, tokens, seqs, width, logits_rows, bucket)


def _pack(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(torch.int64) for t in tensors])


class _StepReceiver:
    """A worker's side: each step's inputs as rank 0 sent them, on this rank's device."""

    def __init__(self, max_num_seqs: int, device: torch.device):
        self._header = torch.zeros(HEADER_FIELDS + max_num_seqs, dtype=torch.int64)
        self.device = device

    def receive(self) -> tuple[int, int, list[torch.Tensor], list[int]]:
        """(kind, bucket, the payload's tensors, query lengths); kind STOP has nothing else."""
        dist.broadcast(self._header, 0, group=_header_group)
        kind, tokens, seqs, width, logits_rows, bucket = self._header[:HEADER_FIELDS].tolist()
        if kind == STOP:
            return kind, 0, [], []
        sizes = [tokens, tokens, tokens, seqs * width, seqs]
        sizes += [seqs + 1, logits_rows] if kind == EAGER else []
        payload = torch.empty(sum(sizes), dtype=torch.int64, device=self.device)
        dist.broadcast(payload, 0)
        parts = list(payload.split(sizes))
        parts[3] = parts[3].to(torch.int32).view(seqs, width)
        parts[4] = parts[4].to(torch.int32)
        if kind == EAGER:
            parts[5] = parts[5].to(torch.int32)
        query_lens = self._header[HEADER_FIELDS : HEADER_FIELDS + seqs].tolist() if kind == EAGER else []
        return kind, bucket, parts, query_lens


class _WorkerRunner:
    """A worker's model, KV cache and decode graphs, running the steps rank 0 sends until it stops."""

    def __init__(self, model: Qwen3Model, config: EngineConfig):
        self.model = model
        self.kv_cache = model.allocate_kv_cache(config.num_kv_blocks, config.block_size)
        self._receiver = _StepReceiver(config.max_num_seqs, model.device)
        self._graphs = None
        # The same choice and the same captures as rank 0's ModelRunner, in the same order.
        if not config.enforce_eager and graphs_unavailable(model.device) is None:
            width = -(-config.max_model_len // config.block_size)
            seqs, device = config.max_num_seqs, model.device
            inputs = StaticInputs(*(torch.zeros(seqs, dtype=torch.int64, device=device) for _ in range(3)),
                                  torch.zeros(seqs, dtype=torch.int32, device=device),
                                  torch.zeros(seqs * width, dtype=torch.int32, device=device), width)
            self._graphs = DecodeGraphRunner(model, self.kv_cache, inputs, graph_buckets(seqs))
            self._graphs.capture()

    def serve(self) -> None:
        while True:
            kind, bucket, parts, query_lens = self._receiver.receive()
            if kind == STOP:
                return
            if kind == GRAPH:
                self._replay(bucket, parts)
                continue
            token_ids, positions, slot_mapping, block_tables, context_lens, query_start_loc, logits_indices = parts
            self.model.forward(ForwardBatch(token_ids, positions, slot_mapping, block_tables, context_lens,
                                            query_start_loc, query_lens, logits_indices), self.kv_cache)

    def _replay(self, bucket: int, parts: list[torch.Tensor]) -> None:
        if self._graphs is None or bucket not in self._graphs.buckets:
            raise RuntimeError(f"rank 0 replays a decode graph of batch size {bucket}, which this rank has not captured")
        inputs = self._graphs.inputs
        token_ids, positions, slot_mapping, block_tables, context_lens = parts
        inputs.token_ids[:bucket].copy_(token_ids)
        inputs.positions[:bucket].copy_(positions)
        inputs.slot_mapping[:bucket].copy_(slot_mapping)
        inputs.block_tables[: block_tables.numel()].copy_(block_tables.reshape(-1))
        inputs.context_lens[:bucket].copy_(context_lens)
        self._graphs.replay(bucket, bucket)


# ---- the worker processes ----


@dataclass(frozen=True)
class _WorkerArgs:
    rank: int
    store_port: int
    model_dir: Path
    device: str
    dtype: str
    kernels: str
    config: EngineConfig
    num_threads: int  # torch's CPU threads on this rank


def _worker_main(args: _WorkerArgs, pipe: connection.Connection) -> None:
    """A worker process: join the groups, load the shard, run steps; any exception goes to rank 0
    as one line, and the process exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_rank0, args=(pipe,), name="nanoserve-rank0-watch", daemon=True).start()
    try:
        from tqdm import tqdm

        from nanoserve_kernels import set_backend

        tqdm.set_lock(threading.RLock())  # not tqdm's default, a multiprocessing lock that outlives os._exit

        set_backend(args.kernels)
        device = resolve_device(args.device)
        if device.type == "cuda":
            torch.cuda.set_device(args.rank)
        else:
            torch.set_num_threads(args.num_threads)
        size = args.config.tensor_parallel_size
        store = dist.TCPStore("127.0.0.1", args.store_port, size, is_master=False, timeout=STARTUP_TIMEOUT)
        _init_process_groups(args.rank, size, store, device)
        model, config = load_rank(args.model_dir, args.device, args.dtype, args.config, args.rank)
        _WorkerRunner(model, config).serve()
    except BaseException as err:  # noqa: BLE001 - whatever it is, rank 0 must hear of it
        pipe.send(_one_line(err))
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def _exit_with_rank0(pipe: connection.Connection) -> None:
    """Rank 0 never writes to a worker's pipe: its end closing means rank 0 stopped or died."""
    try:
        pipe.recv()
    except (EOFError, OSError):
        pass
    os._exit(0)


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:400] if lines else ''}".rstrip(": ")


class TensorParallelWorkers:
    """Rank 0's handle on ranks 1..N-1: starts their processes, loads its own shard beside them
    (`load_rank0`), watches them and stops them when the process exits."""

    def __init__(self, model_dir: Path, device: str, dtype: str, kernels: str, config: EngineConfig):
        size = config.tensor_parallel_size
        shard_of(load_config(model_dir), 0, size)  # a size that does not divide the model fails here, at once
        torch_device = resolve_device(device)
        if torch_device.type == "cuda" and torch.cuda.device_count() < size:
            raise ValueError(f"--tensor-parallel-size {size} needs {size} GPUs, {torch.cuda.device_count()} are visible")
        self.size, self.model_dir, self.device, self.dtype, self.config = size, model_dir, device, dtype, config
        self._num_threads = max(1, (os.cpu_count() or 1) // size)
        if torch_device.type == "cpu":
            torch.set_num_threads(self._num_threads)
        self._store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=STARTUP_TIMEOUT,
                                    wait_for_workers=False)
        context = mp.get_context("spawn")
        self._processes: list[mp.Process] = []
        self._pipes: list[connection.Connection] = []
        for rank in range(1, size):
            ours, theirs = context.Pipe()
            args = _WorkerArgs(rank, self._store.port, model_dir, device, dtype, kernels, config, self._num_threads)
            process = context.Process(target=_worker_main, args=(args, theirs), name=f"nanoserve-rank{rank}", daemon=True)
            process.start()
            theirs.close()
            self._processes.append(process)
            self._pipes.append(ours)
            logger.info("tensor parallel: rank %d is process %d", rank, process.pid)
        self._lock = threading.Lock()
        self._failed = False  # the first failure, of any rank, is the one reported
        self._stopping = False
        self._on_failure = None  # once serving: makes the engine dead
        atexit.register(self.stop)
        global _stop_server
        _stop_server = self._fail
        threading.Thread(target=self._watch, name="nanoserve-tp-watch", daemon=True).start()

    def load_rank0(self) -> tuple[Qwen3Model, EngineConfig]:
        """Rank 0's shard and the agreed engine sizes (see `load_rank`)."""
        try:
            _init_process_groups(0, self.size, self._store, resolve_device(self.device))
            return load_rank(self.model_dir, self.device, self.dtype, self.config, 0)
        except BaseException:
            if not self._claim_failure():  # a worker's error came first: the watcher is ending the process
                time.sleep(60)
            raise

    def serving(self, on_failure) -> None:
        """From now on a worker's failure calls `on_failure(reason)` before the server exits."""
        self._on_failure = on_failure

    def stop(self) -> None:
        """End every worker: closing the pipes ends them at once; those that do not, by signal."""
        self._stopping = True
        for pipe in self._pipes:
            _hang_up(pipe)
        for process in self._processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)

    def _claim_failure(self) -> bool:
        with self._lock:
            first, self._failed = not self._failed, True
            return first

    def _watch(self) -> None:
        """Wait for the first worker to report an exception or to exit, and fail with it. A worker
        sends its exception before it exits, so a pipe at its end with nothing in it means the
        process ended without one (killed, or died in native code)."""
        rank_of = {}
        for rank, (process, pipe) in enumerate(zip(self._processes, self._pipes), start=1):
            rank_of[process.sentinel] = rank_of[pipe] = rank
        try:
            rank = rank_of[connection.wait(list(rank_of))[0]]
            pipe, process = self._pipes[rank - 1], self._processes[rank - 1]
            try:
                message = pipe.recv() if pipe.poll() else None
            except EOFError:
                message = None
        except (OSError, ValueError):  # our ends were closed under us: stopping
            return
        if message is not None:
            return self._fail(f"tensor-parallel rank {rank} failed: {message}")
        process.join(timeout=5)
        self._fail(f"tensor-parallel rank {rank} exited {_exit_status(process.exitcode)}")

    def _fail(self, reason: str) -> None:
        if self._stopping or not self._claim_failure():
            return
        on_failure = self._on_failure
        print(f"nanoserve: error: {reason}" + ("; the server stops" if on_failure else ""), file=sys.stderr, flush=True)
        if on_failure is not None:
            on_failure(reason)
            time.sleep(FAILURE_GRACE_S)
        self.stop()
        os._exit(1 if on_failure is not None else 2)


def _hang_up(pipe: connection.Connection) -> None:
    """Close our end so that the worker reads EOF now: a plain close would not while the watcher
    thread still polls the socket (the poll holds it open), so shut the socket down first."""
    if pipe.closed:
        return
    with socket.socket(fileno=os.dup(pipe.fileno())) as sock:
        sock.shutdown(socket.SHUT_RDWR)
    pipe.close()


def _exit_status(code: int | None) -> str:
    if code is not None and code < 0:
        return f"(killed by {signal.Signals(-code).name})"
    return f"with status {code}"
