"""embed and predict on a Ray cluster: the same inputs, code and answers, run as a Ray Data pipeline.

    read (one streaming reader task, records judged as locally) -> a pool of actors, each holding one utr_runtime
    model, each call embedding or predicting one chunk of whole sequences -> rows back to the driver in input order

A sequence's windows are run together, inside one actor call, by the same `Model.embed` / `Model.predict` as on one
machine: so long sequences need no re-assembly across actors, and results equal the single-process ones (up to
float rounding of different batch paddings). Tokenizing and windowing stay in the actor because they are a small
share of the work (docs/scaling.md); the model is the work, and the actor pool spreads it.

Faults: Ray Data restarts a killed actor and re-runs its chunk (actors get unlimited restarts and task retries);
each chunk's rows are delivered once. The driver checks that every record arrives exactly once, in order.

`embed_dataset` / `predict_dataset` are the entry points for a Ray Dataset you already have (Parquet or CSV from an
object store, say); `utrexport embed/predict --ray` wraps a sequence file around them. Ray (the `[ray]` extra) is
imported here only, and this module only where Ray is wanted.
"""

from __future__ import annotations

import os
import warnings
from typing import Iterator

import numpy as np
import ray
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

def embed_dataset(ds, bundle: str, *, sequence_column: str = "sequence", output_column: str = "embedding", workers: int | None = None,
                  threads: int = 1, chunk: int = 256, precision: str = "fp32", device: str = "cpu", engine: str = "auto", **embed_options):
    """`ds` with an `output_column` of embeddings (float32, hidden size) added: Model.embed on each chunk of rows.

    workers: actors (one model each; default: the cluster's CPUs // threads); threads: engine threads per actor;
    device cuda or tensorrt gives each actor one GPU. embed_options go to Model.embed (pooling, overlap, truncation, ...).
    """
    return _map(ds, bundle, "embed", sequence_column, output_column, workers, threads, chunk,
                dict(precision=precision, device=device, engine=engine), embed_options)


def predict_dataset(ds, bundle: str, *, sequence_column: str = "sequence", output_column: str = "prediction", workers: int | None = None,
                    threads: int = 1, chunk: int = 256, precision: str = "fp32", device: str = "cpu", engine: str = "auto", **predict_options):
    """`ds` with an `output_column` of task predictions added (Model.predict: probabilities, or values; for nucleotide
    and contact heads one array per sequence). predict_options go to Model.predict (logits, aggregate, overlap, ...)."""
    return _map(ds, bundle, "predict", sequence_column, output_column, workers, threads, chunk,
                dict(precision=precision, device=device, engine=engine), predict_options)


class _ModelActor:
    """One utr_runtime model, loaded once per actor; each call runs one batch of rows through embed or predict."""

    def __init__(self, bundle: str, operation: str, sequence_column: str, output_column: str, load_options: dict, run_options: dict):
        import utr_runtime

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", utr_runtime.UntrainedModelWarning)  # the driver has said so once
            self.model = utr_runtime.load(bundle, **load_options)
        self.run = getattr(self.model, operation)
        self.columns = (sequence_column, output_column)
        self.options = run_options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sequences, output = self.columns
        result = self.run([str(s) for s in batch[sequences]], **self.options)
        if isinstance(result, list):  # one array per sequence, shapes differ: a column of arrays
            column = np.empty(len(result), dtype=object)
            column[:] = result
            result = column
        return {**batch, output: result}


def _map(ds, bundle: str, operation: str, sequence_column: str, output_column: str, workers, threads: int, chunk: int,
         load_options: dict, run_options: dict):
    gpu = load_options["device"] != "cpu"
    if not ray.is_initialized():
        ray.init()  # what Ray Data would do on first use; the pool's default size needs the cluster's resources now
    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("GPU" if gpu else "CPU", 1) // (1 if gpu else threads)))
    import utr_runtime

    bundle = os.path.abspath(bundle)
    utr_runtime.Bundle(bundle)  # a missing or foreign bundle fails here, in one line, not in every actor
    load_options = {**load_options, "threads": threads}
    return ds.map_batches(
        _ModelActor,
        fn_constructor_args=(bundle, operation, sequence_column, output_column, load_options, run_options),
        batch_size=chunk,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=threads,
        num_gpus=1 if gpu else 0,
    )


def start(address: str | None, log) -> None:
    """Join the cluster at `address`, or start a local Ray (address None) sized to this machine."""
    import logging

    if ray.is_initialized():
        return
    if address and address != "auto":
        _check_reachable(address)
    # Not the user's business: a local Ray's note that it enabled token authentication (it stays enabled), and Ray
    # Data's note that its progress bars are off (the CLI reports progress itself).
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False,
             configure_logging=True, **({} if address else {"num_cpus": os.cpu_count()}))
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its plan and timing lines: the CLI reports progress itself
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # outputs in input order
    context.enable_progress_bars = False
    resources = ray.cluster_resources()
    log(f"Ray {'cluster at ' + address if address else 'started locally'}: {int(resources.get('CPU', 0))} CPUs, "
        f"{int(resources.get('GPU', 0))} GPUs, {len(ray.nodes())} node(s)")


REACH_TIMEOUT = 10.0  # seconds to open a TCP connection to a cluster's address (Ray itself retries for ever)


def _check_reachable(address: str) -> None:
    """One line, within seconds, for an address no Ray cluster answers at: ray.init would retry it for ever."""
    import importlib.util
    import socket

    from utr_runtime.errors import UtrError

    client = address.startswith("ray://")
    if client and importlib.util.find_spec("grpc") is None:
        raise UtrError("--ray ray://... connects through Ray Client, which needs grpcio: pip install 'ray[client]'")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UtrError(f"--ray {address}: give HOST:PORT (the head node's GCS, port 6379 by default), ray://HOST:PORT (Ray Client, "
                       "port 10001) or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e)).lower()
        raise UtrError(f"--ray {address}: no Ray cluster answers there ({reason}); start one with `ray start --head`, "
                       "or check the address and port") from None


class SequenceFile(Datasource):
    """A sequence file as a Ray Data source: one reader task streams it in blocks of judged records, in order.

    One reader is enough (reading is far faster than the model) and keeps the order without a sort. The file must
    be readable at the same path on the node the task runs on (local Ray, or a shared filesystem)."""

    def __init__(self, path: str, column, chunk: int, max_length: int, k: int, strict: bool, max_kmers):
        super().__init__()
        self.args = (path, column, chunk, max_length, k, strict, max_kmers)

    def estimate_inmemory_data_size(self):
        return os.path.getsize(self.args[0])

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        metadata = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=[self.args[0]])
        return [ReadTask(lambda: _read_blocks(*self.args), metadata)]


def _read_blocks(path, column, chunk, max_length, k, strict, max_kmers) -> Iterator:
    """Blocks (pyarrow tables: index, id, sequence) of the valid records; invalid ones were reported by the driver."""
    import pyarrow as pa

    from utr_runtime.model import judge
    from utr_runtime.tokenizer import KmerTokenizer

    from .records import valid_chunks

    tokenizer, index = KmerTokenizer(k), 0
    check = lambda seqs: judge(tokenizer, seqs, strict, max_kmers)[1]  # noqa: E731
    for records in valid_chunks(path, column, chunk, check, lambda name, reason: None, True, max_length):
        yield pa.table({"index": np.arange(index, index + len(records)), "id": [n for n, _ in records], "sequence": [s for _, s in records]})
        index += len(records)


def run_file(operation: str, bundle: str, path: str, *, column, chunk: int, max_length: int, k: int, strict: bool, max_kmers,
             workers, threads: int, load_options: dict, run_options: dict) -> Iterator[tuple[list[str], list[str], object]]:
    """(names, sequences, result) per chunk of a sequence file, in input order, run on the Ray cluster `start` joined.

    result is what Model.embed / Model.predict return for those sequences. Raises if a record arrives twice or never.
    """
    # The reader reserves no CPU: it is light, and actors sized to every CPU would otherwise leave it none (a deadlock).
    ds = ray.data.read_datasource(SequenceFile(os.path.abspath(path), column, chunk, max_length, k, strict, max_kmers), num_cpus=0)
    mapped = _map(ds, bundle, operation, "sequence", "result", workers, threads or 1, chunk, load_options, run_options)
    expected = 0
    for batch in mapped.iter_batches(batch_size=chunk, batch_format="numpy", prefetch_batches=1):
        index = batch["index"]
        if not np.array_equal(index, np.arange(expected, expected + len(index))):
            raise RuntimeError(f"the cluster delivered records {index[:3].tolist()}... where record {expected} was due")
        expected += len(index)
        result = batch["result"]
        yield [str(n) for n in batch["id"]], [str(s) for s in batch["sequence"]], (list(result) if result.dtype == object else result)


@ray.remote(max_restarts=-1, max_task_retries=-1)
class _VariantActor:
    """One utr_runtime model; each call scores one group of variants (utrexport.scoring.score_group)."""

    def __init__(self, bundle: str, load_options: dict):
        import utr_runtime

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", utr_runtime.UntrainedModelWarning)  # the driver has said so once
            self.model = utr_runtime.load(bundle, **load_options)

    def score(self, group, overlap: int, max_batch_tokens: int, zero_shot: bool) -> dict:
        from .scoring import score_group

        return score_group(self.model, group, overlap, max_batch_tokens, lambda n: None, zero_shot=zero_shot)


def score_groups(bundle: str, groups, load_options: dict, workers: int | None, overlap: int, max_batch_tokens: int,
                 zero_shot: bool) -> Iterator[tuple[list, dict]]:
    """(group, its columns) for each group of variants (utrexport.scoring.groups), in order, scored by a pool of
    actors on the cluster `start` joined: each group is scored whole by one actor, exactly as in one process (a
    sequence's reference and its mutants meet in the same batches), so the table is the same. A killed actor is
    restarted and its group scored again."""
    from ray.util import ActorPool

    gpu = load_options["device"] != "cpu"
    threads = load_options.get("threads") or 1
    groups = [[(_trimmed(job, piece), slice(0, piece.stop - piece.start)) for job, piece in group] for group in groups]
    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("GPU" if gpu else "CPU", 1) // (1 if gpu else threads)))
    workers = min(workers, len(groups))
    options = {**load_options, "threads": threads}
    actors = [_VariantActor.options(num_cpus=threads, num_gpus=1 if gpu else 0).remote(os.path.abspath(bundle), options) for _ in range(workers)]
    pool = ActorPool(actors)
    try:
        yield from zip(groups, pool.map(lambda actor, group: actor.score.remote(group, overlap, max_batch_tokens, zero_shot), groups))
    finally:
        for actor in actors:
            ray.kill(actor)


def _trimmed(job, piece: slice):
    """The part of a job a group scores: an actor is sent that piece's edits, not the whole saturation's."""
    import dataclasses

    return dataclasses.replace(job, edits=job.edits[piece], rows=job.rows[piece])
