"""The map stage on a Ray cluster, through Ray Data, with the local engine's output contract.

Per chunk of items the driver builds a dataset of ``(index, item)`` rows and runs:

    CPU tasks (map_batches)      read + decode + resize/crop each item; a bad file becomes an
                                 error record, never an exception (Ray would fail the block)
    model actors (map_batches,   one model per actor, loaded once by the actor from its spec
    an actor pool)               (the task is shipped with the model replaced by a reference,
                                 so no weights travel from the driver); task.map, overlays and
                                 maps written by the actor, the batch's rows written as a part
                                 named after the run and its first item (never Ray's uuids)
    driver                       counts the small (ok, failed, errors) records the actors return,
                                 and feeds the task's summary the few columns it counts

Parts land in the output's parts folder exactly as the local engine's do, so resume, the
final sort-and-merge and the summary are :func:`~visbatch.core.pipeline.run_pipeline`'s own.
Ray may rerun a batch (a lost worker): its part has the same name and replaces itself, so a
row is never counted twice in the output. Ordering is never taken from Ray: rows carry keys.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visbatch.core.engines import Committed, EngineOptions, EngineRun
from visbatch.core.errors import FatalError, UsageError
from visbatch.core.images import ImageDataset, ImageItem, collate

CHUNK_SIZE = 65536  # items per Ray dataset: each dataset starts its actors (and loads the model) once


# ----------------------------------------------------------------------------
# Connecting
# ----------------------------------------------------------------------------


def connect(options: EngineOptions) -> dict:
    """Join (or start) the cluster; returns which cluster and its size, for the summary and the
    output's metadata."""
    import ray

    address = options.address
    if address not in ("auto", "local"):
        _check_reachable(address)
    started_here = False
    if not ray.is_initialized():
        dropped: list[bytes] = []
        with _without_ray_logs(dropped):
            started_here = _init(ray, address, dropped)
    _quiet_ray_data()
    resources = ray.cluster_resources()
    return {
        "address": _gcs_address(ray),
        "started_here": started_here,
        "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
        "cpus": float(resources.get("CPU", 0)),
        "gpus": float(resources.get("GPU", 0)),
    }


def describe_cluster(cluster: dict) -> str:
    """The summary's line on where the run ran: ``--ray-address auto`` joins whatever runs here."""
    how = "started here for this run" if cluster.get("started_here") else "joined"
    return (
        f"Ray cluster at {cluster.get('address') or '?'} ({how}): {cluster.get('nodes', 0)} nodes, "
        f"{cluster.get('cpus', 0):g} CPUs, {cluster.get('gpus', 0):g} GPUs"
    )


def _gcs_address(ray) -> str | None:
    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:  # an older Ray without it: the size alone is said
        return None


# What the workers must see of the driver's environment to read the inputs and write the
# outputs as the driver does: object-storage endpoints and credentials (AWS_*, FSSPEC_*, ...),
# and visbatch's own settings (--hash, the staging folder).
_FORWARDED_PREFIXES = (
    "AWS_",
    "FSSPEC_",
    "S3_",
    "GOOGLE_",
    "GCS_",
    "AZURE_",
    "HF_",
    "HUGGINGFACE_",
    "VISBATCH_",
)
_FORWARDED_NAMES = ("GCE_METADATA_HOST", "NO_PROXY", "HTTPS_PROXY", "HTTP_PROXY", "no_proxy", "https_proxy")


def forwarded_environment(environ=None) -> dict[str, str]:
    """The storage and visbatch variables set in the driver, for the workers' ``runtime_env``
    (a worker on another node sees none of the driver's environment otherwise)."""
    environ = os.environ if environ is None else environ
    return {
        name: value
        for name, value in environ.items()
        if (name.startswith(_FORWARDED_PREFIXES) or name in _FORWARDED_NAMES) and value
    }


def _init(ray, address: str, dropped: list[bytes]) -> bool:
    """ray.init for ``address``; True when this process started the cluster."""
    quiet: dict[str, Any] = {
        "log_to_driver": False,
        "logging_level": logging.ERROR,
        "include_dashboard": False,
        "runtime_env": {"env_vars": forwarded_environment()},
    }
    # Ask for 127.0.0.1 as the node's address. Ray (2.60) still binds its GCS and raylet on
    # every interface: the README says so, and that Ray's token authentication guards them.
    local: dict[str, Any] = {**quiet, "_node_ip_address": "127.0.0.1"}
    if address == "local":
        ray.init(**local)
        return True
    if address == "auto":
        try:
            ray.init(address="auto", **quiet)
            return False
        except ConnectionError:
            ray.init(**local)
            return True
    try:
        ray.init(address=address, **quiet)
    except Exception as exc:
        raise FatalError(f"cannot join the Ray cluster at {address}: {join_failure(exc, dropped)}") from exc
    return False


def join_failure(exc: BaseException, dropped: list[bytes]) -> str:
    """Why joining failed, in one line: Ray's own cause when its log said it (an authentication
    token missing or wrong is logged, while the exception only says it could not connect)."""
    said = [line.decode("utf-8", "replace").strip() for line in dropped]
    auth = next((line for line in said if "uthenticat" in line or "auth token" in line.lower()), None)
    if auth is None and "uthenticat" in str(exc):
        auth = _first_line(exc)
    if auth is not None:
        cause = _RAY_LOG_LINE.sub(b"", auth.encode()).decode()
        return (
            f"{cause[:240]} (the cluster uses Ray's token authentication: give its token in RAY_AUTH_TOKEN "
            "or RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token; see `ray get-auth-token`)"
        )
    return _first_line(exc)


def _check_reachable(address: str) -> None:
    """A TCP connect with a timeout first: ray.init on a dead address can wait for minutes."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--ray-address {address!r}: give auto, local or HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=5) as connection:
            # Ray's GCS speaks gRPC: an HTTP/2 server answers the client preface with a SETTINGS
            # frame (type 4). Anything else (an HTTP/1 server, silence) is not a Ray cluster, and
            # ray.init would retry against it for minutes.
            connection.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
            reply = connection.recv(9)
    except OSError as exc:
        raise FatalError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from exc
    if len(reply) < 4 or reply[3] != 4:
        raise FatalError(f"cannot reach the Ray cluster at {address}: the service there is not a Ray (gRPC) server")


def _quiet_ray_data() -> None:
    import ray.data

    context = ray.data.DataContext.get_current()
    verbose = bool(os.environ.get("VISBATCH_VERBOSE"))
    context.enable_progress_bars = verbose
    context.enable_operator_progress_bars = verbose
    context.print_on_execution_start = verbose
    context.enable_auto_log_stats = False
    for name in ("ray", "ray.data", "ray.train"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)


# Ray's C++ core worker logs to this process's stderr: "[2026-12-02 20:59:06,008 E 7682 7682] file.cc:N: ..."
_RAY_LOG_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d [\d:,]+ [A-Z] \d+ \d+\] ")


@contextmanager
def _without_ray_logs(dropped: list[bytes] | None = None) -> Iterator[None]:
    """stderr (the file descriptor, which Ray's C++ side writes to) with Ray's log lines
    dropped (the last hundred kept in ``dropped``, to say why a join failed), visbatch's own
    lines kept; everything with VISBATCH_VERBOSE set."""
    if os.environ.get("VISBATCH_VERBOSE"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                if not _RAY_LOG_LINE.match(line):
                    os.write(saved, line)
                elif dropped is not None:
                    dropped.append(line)
                    del dropped[:-100]

    thread = threading.Thread(target=pump, name="visbatch-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer closes: the pump drains it and ends
        thread.join(timeout=5)
        os.close(saved)


def _first_line(exc: BaseException) -> str:
    """The cause of a Ray error in one line: its innermost exception's message."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        return _first_line(cause)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text[:300]


# ----------------------------------------------------------------------------
# The task without its model: shipped to the actors
# ----------------------------------------------------------------------------


def _model_parts(model) -> dict[int, tuple]:
    """id -> reference for the model and everything inside it (modules, parameters, buffers)."""
    parts: dict[int, tuple] = {id(model): ("model",)}
    module = getattr(model, "module", None)
    if isinstance(module, torch.nn.Module):
        for name, sub in module.named_modules():
            parts.setdefault(id(sub), ("module", name))
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            parts.setdefault(id(tensor), ("tensor", name))
    return parts


def ship_task(task, model) -> bytes:
    """The task pickled with its model (and any of its modules or weights) as references."""
    import ray.cloudpickle as cloudpickle

    parts = _model_parts(model)

    class Pickler(cloudpickle.CloudPickler):
        def persistent_id(self, obj):
            return parts.get(id(obj))

    buffer = io.BytesIO()
    Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(task)
    return buffer.getvalue()


def receive_task(payload: bytes, model):
    """The task, its model references bound to ``model`` (the actor's own)."""
    module = getattr(model, "module", None)
    tensors = dict([*module.named_parameters(), *module.named_buffers()]) if module is not None else {}

    class Unpickler(pickle.Unpickler):
        def persistent_load(self, pid):
            kind = pid[0]
            if kind == "model":
                return model
            if kind == "module":
                return module.get_submodule(pid[1]) if pid[1] else module
            return tensors[pid[1]]

    return Unpickler(io.BytesIO(payload)).load()


def model_recipe(model) -> dict:
    """How an actor loads the same model: spec, weights, precision, runtime, checksum."""
    from visbatch.core.models import dtype_name

    return {
        "device_only": not hasattr(model, "module"),
        "spec": model.spec,
        "pretrained": getattr(model, "pretrained", None),
        "precision": dtype_name(model.dtype),
        "runtime": getattr(model, "runtime", None),
        "checksum": model.checksum,
    }


def load_from_recipe(recipe: dict, device: str):
    from visbatch.core.models import DeviceOnly, load_model

    if recipe["device_only"]:
        return DeviceOnly(device, recipe["precision"])
    model = load_model(recipe["spec"], recipe["pretrained"], device, recipe["precision"], runtime=recipe["runtime"])
    if recipe["checksum"] and model.checksum != recipe["checksum"]:
        raise FatalError(
            f"the model {recipe['spec']} on a Ray worker has other weights than on the driver "
            f"({model.checksum[:12]} vs {recipe['checksum'][:12]}); give every node the same files"
        )
    return model


# ----------------------------------------------------------------------------
# The two stages
# ----------------------------------------------------------------------------


class DecodeStage:
    """CPU stage: ImageDataset's decode for each row; never raises for a bad file."""

    def __init__(self, geometry, max_pixels, display_size, annotate):
        self.geometry, self.max_pixels, self.display_size, self.annotate = geometry, max_pixels, display_size, annotate
        self.read_one = False  # whether this worker has read any sample yet

    def _check_first_read(self, record) -> None:
        """A worker whose first reads all fail on storage (an endpoint or credentials the
        driver has and the worker lacks) stops the run with the cause, instead of an error row
        per sample after a minute of retries each."""
        if not is_storage_failure(record.error or ""):
            self.read_one = True
        elif not self.read_one:
            raise FatalError(f"a Ray worker cannot read its first sample: {record.error}")

    def __call__(self, batch: dict) -> dict:
        items = [pickle.loads(raw) for raw in batch["item"]]
        dataset = ImageDataset(items, self.geometry, self.max_pixels, self.display_size, self.annotate)
        images, shapes, records = [], [], []
        for position, index in enumerate(batch["index"]):
            try:
                tensor, record = dataset[position]
            except Exception as exc:  # ImageDataset turns bad files into records; anything else too
                from visbatch.core.images import Record

                tensor, record = None, Record(index=position, item=items[position], status="error", error=str(exc))
            record.index = int(index)
            self._check_first_read(record)
            images.append(b"" if tensor is None else tensor.contiguous().numpy().tobytes())
            shapes.append(list(tensor.shape) if tensor is not None else [0, 0, 0])
            records.append(pickle.dumps(record))
        return {
            "index": np.asarray(batch["index"], dtype=np.int64),
            "image": np.array(images, dtype=object),
            "shape": np.asarray(shapes, dtype=np.int64).reshape(-1, 3),
            "record": np.array(records, dtype=object),
        }


def is_storage_failure(error: str) -> bool:
    """Whether an error row's reason is the storage's (unreachable, denied), not the file's."""
    return error.startswith("cannot read image:") or "cannot reach " in error or "access denied" in error


def _deltas(task, before: dict[str, int]) -> dict[str, int]:
    now = task.counters() if hasattr(task, "counters") else {}
    return {k: v - before.get(k, 0) for k, v in now.items()}


class ModelStage:
    """Actor stage: one model per actor; task.map, the batch's files, its part."""

    def __init__(self, shipment: list):
        import ray

        from visbatch.core.overlays import FolderSink, npy_bytes

        # The task, the model's recipe and the settings come by reference: a constructor
        # argument this large would sit in the object store, where an actor restart may lose it.
        payload, recipe, device, settings = ray.get(shipment[0])

        self.model = load_from_recipe(recipe, device)
        self.task = receive_task(payload, self.model)
        self.settings = settings
        config = settings["config"]
        # The driver's plan, its writes only: the actor's files are admitted as the driver's are.
        self._plan = config.plan.activated() if config.plan is not None else None
        if self._plan is not None:
            self._plan.__enter__()
        roots = config.roots
        self.overlay_sink = FolderSink(config.overlays, "overlay", roots) if config.overlays else None
        self.map_sink = (
            FolderSink(config.save_maps, "map", roots, suffix=".npy", encode=npy_bytes) if config.save_maps else None
        )

    def __call__(self, batch: dict) -> dict:
        from visbatch.core.batches import OverlayLook, batch_tally, process_batch, settle, summary_rows
        from visbatch.core.outputs import rows_table, write_part

        decoded = collate(_decoded_batch(batch))
        s = self.settings
        drawn = self.overlay_sink.written if self.overlay_sink is not None else 0
        counted = self.task.counters() if hasattr(self.task, "counters") else {}
        look = OverlayLook.of(s["config"])
        pending = process_batch(self.task, self.model, decoded, self.overlay_sink, self.map_sink, look, s["multi_root"])
        rows = settle(pending)
        first = decoded.records[0].index
        write_part(Path(s["parts_dir"]), rows_table(s["schema"], rows), f"part-{s['run_tag']}-{first:012d}.arrow")
        ok, failed, errors = batch_tally(rows)
        drawn = (self.overlay_sink.written if self.overlay_sink is not None else 0) - drawn
        return {
            "ok": np.array([ok]),
            "failed": np.array([failed]),
            "errors": np.array([json.dumps(errors)]),
            "overlays": np.array([drawn]),
            # The columns the task's summary counts go back to the driver's task (a few per row).
            "observed": np.array([pickle.dumps(summary_rows(self.task, rows))], dtype=object),
            "counted": np.array([json.dumps(_deltas(self.task, counted))]),
        }


def _decoded_batch(batch: dict):
    """A DecodeStage batch back as (uint8 tensors or None, records), in item order."""
    records = [pickle.loads(raw) for raw in batch["record"]]
    tensors = [
        torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).reshape([int(v) for v in shape]).copy())
        if len(raw)
        else None
        for raw, shape in zip(batch["image"], batch["shape"])
    ]
    order = sorted(range(len(records)), key=lambda i: records[i].index)
    return [(tensors[i], records[i]) for i in order]


def _batches_of(dataset) -> Iterator[dict]:
    """A dataset's batches, Ray's logs quiet while it runs, its failures one-line FatalErrors."""
    try:
        with _without_ray_logs():
            yield from dataset.iter_batches(batch_size=None, batch_format="numpy")
    except (FatalError, UsageError):
        raise
    except Exception as exc:
        if "KeyboardInterrupt" in type(exc).__name__:
            raise KeyboardInterrupt from exc
        raise FatalError(f"the Ray job failed: {_first_line(exc)}") from exc


def decode_batches(items: Sequence[ImageItem], geometry, config) -> Iterator:
    """The decode stage alone on the cluster (CPU tasks), its batches collated on the driver in
    item order: for the jobs whose reduce needs the decoded images themselves (quantize's
    calibration, whose block-by-block statistics depend on the blocks already quantized)."""
    import ray.data

    connect(config.engine)
    stage = DecodeStage(geometry, config.max_pixels, None, None)
    rows = [{"index": i, "item": pickle.dumps(item)} for i, item in enumerate(items)]
    dataset: Any = ray.data.from_items(rows).map_batches(
        stage, batch_size=config.batch_size, batch_format="numpy", num_cpus=1
    )
    decoded = []
    for batch in _batches_of(dataset):
        decoded += _decoded_batch(batch)
    decoded.sort(key=lambda pair: pair[1].index)  # blocks may come back in any order
    for start in range(0, len(decoded), config.batch_size):
        yield collate(decoded[start : start + config.batch_size])


# ----------------------------------------------------------------------------
# The runner the pipeline calls per chunk
# ----------------------------------------------------------------------------


class RayEngine:
    """``--engine ray``: the cluster is joined when the engine opens (before any output exists);
    decode runs in CPU tasks, the model in actors that write their batches' parts themselves."""

    def __init__(self, options: EngineOptions):
        self.options = options
        self.cluster = connect(options)
        self.said = describe_cluster(self.cluster)

    def start(self, run: EngineRun) -> dict:
        task, model, config, options, cluster = run.task, run.model, run.config, self.options, self.cluster
        gpus = options.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if cluster["gpus"] >= 1 else 0.0
        if gpus > 0 and cluster["gpus"] < gpus:
            raise UsageError(f"--gpus-per-worker {gpus:g}: the Ray cluster has {cluster['gpus']:g} GPUs")
        concurrency = options.concurrency
        if concurrency is None:
            actors = max(1, int(cluster["gpus"] // gpus)) if gpus > 0 else 1
            concurrency = (1, actors)
        self.gpus, self.concurrency = gpus, concurrency
        self.batch_size = config.batch_size
        self.task = task
        self.decode_stage = DecodeStage(
            getattr(task, "geometry", None) or model.preprocess.geometry,
            config.max_pixels,
            config.overlay_size if config.overlays else None,
            getattr(task, "annotate", None),
        )
        # The actors run the same configuration, without what only the driver holds; every path
        # absolute (a worker's working folder is not the driver's).
        from dataclasses import replace

        actor_config = replace(
            config,
            remote=None,
            engine=None,
            command_line=[],
            plan=config.plan.writes_only() if config.plan is not None else None,
            output=os.path.abspath(config.output),
            overlays=os.path.abspath(config.overlays) if config.overlays else None,
            save_maps=os.path.abspath(config.save_maps) if config.save_maps else None,
        )
        import ray

        settings = {
            "config": actor_config,
            "multi_root": run.multi_root,
            "schema": run.writer.schema,
            "parts_dir": os.path.abspath(run.writer.parts_dir),
            "run_tag": f"{time.time_ns():020d}",
        }
        # Held by the driver for the whole run, so a restarted actor finds it.
        self.shipment = ray.put((ship_task(task, model), model_recipe(model), "cuda" if gpus > 0 else "cpu", settings))
        return {"engine": "ray", **cluster, "gpus_per_worker": gpus, "actors": list(concurrency)}

    def _dataset(self, rows: list[dict]):
        """The chunk's Ray dataset: decode tasks, then the model actors."""
        import ray.data

        dataset: Any = ray.data.from_items(rows)
        dataset = dataset.map_batches(self.decode_stage, batch_size=self.batch_size, batch_format="numpy", num_cpus=1)
        dataset = dataset.map_batches(
            ModelStage,
            fn_constructor_args=([self.shipment],),
            batch_size=self.batch_size,
            batch_format="numpy",
            concurrency=self.concurrency,
            num_gpus=self.gpus,
            num_cpus=0 if self.gpus > 0 else 1,
        )
        return dataset

    def run(
        self, items: Sequence[ImageItem], offset: int, commit: Callable[[Committed], None], stop: Callable[[], bool]
    ) -> None:
        """Each batch the actors commit, as they finish them; every item must come back committed."""
        from visbatch.core.batches import observe

        committed = 0
        for start in range(0, len(items), CHUNK_SIZE):
            part = items[start : start + CHUNK_SIZE]
            rows = [{"index": offset + start + i, "item": pickle.dumps(item)} for i, item in enumerate(part)]
            dataset = self._dataset(rows)
            for batch in _batches_of(dataset):
                for ok, failed, errors, drawn, observed, counted in zip(
                    batch["ok"],
                    batch["failed"],
                    batch["errors"],
                    batch["overlays"],
                    batch["observed"],
                    batch["counted"],
                ):
                    observe(self.task, pickle.loads(observed))
                    if hasattr(self.task, "add_counters"):
                        self.task.add_counters(json.loads(counted))
                    commit(Committed(int(ok), int(failed), json.loads(errors), int(drawn)))
                    committed += int(ok) + int(failed)
                if stop():
                    return
        if committed < len(items):  # more is a batch Ray ran again (its part replaced)
            raise FatalError(
                f"the Ray workers committed {committed} rows for the {len(items)} images handed "
                "to them; the output is not finished (rerun with --resume)"
            )

    def finish(self, commit: Callable[[Committed], None]) -> None:
        """Nothing is held on the driver: the actors commit their own batches."""

    def decode(self, items: Sequence[ImageItem], model, config) -> Iterator:
        return decode_batches(items, model.preprocess.geometry, config)


def open_engine(options: EngineOptions) -> RayEngine:
    return RayEngine(options)
