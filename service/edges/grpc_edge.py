"""The Open Inference Protocol over gRPC (KServe v2's gRPC binding, as Triton serves it), on the engine.

Each BentoML worker runs one grpc.aio server in its own event loop, beside its HTTP app, on the same Engine:
the same admission (and its pacing), decoding pool, batcher, limits, metrics and API key. The workers share one
port: each binds it with SO_REUSEPORT and the kernel spreads connections over them. Thin, as the HTTP edges:
a key check, then parse (grpc_codec.py) -> one `Engine.classify` -> encode. A RequestError becomes its gRPC
status code (grpc_codec.GRPC_STATUS) with the message REST sends; anything else is logged and answered
INTERNAL without its traceback.

Keys: metadata `authorization: Bearer <key>` (gRPC metadata names are lower case) on every RPC but ServerLive
and ServerReady, which stay open for probes as /v2/health/* do.

The stubs are generated from Triton's published protocol files and committed (oip_proto/), rather than taken
from tritonclient, which ships the same generated modules: in the serving image that would add a client library
and what it pulls in (python-rapidjson, urllib3, ml-dtypes, packaging) for three generated files, importing them
runs its whole client package first, and its `grpc` extra caps protobuf below 7 (this project's environment
runs 7). Generated here, the image needs grpcio and protobuf only (protobuf comes with onnxruntime already).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
from typing import Any, Awaitable, Callable

import grpc

import tuneserve
from tuneserve.service.edges import grpc_codec, oip
from tuneserve.service.edges.front import Keys
from tuneserve.service.edges.oip_proto import grpc_service_pb2 as pb
from tuneserve.service.edges.oip_proto import grpc_service_pb2_grpc as pb_grpc
from tuneserve.service.edges.route_table import API
from tuneserve.service.engine.engine import Engine
from tuneserve.service.engine.errors import RequestError
from tuneserve.service.engine.model_version import ModelVersion

log = logging.getLogger("tuneserve.service.grpc")

SERVICE = "inference.GRPCInferenceService"
# The address BentoML serves HTTP on, handed from its main process to the workers: gRPC binds the same one, so
# the exposure rule (service/config.py, check_exposure) that passed for HTTP covers it; loopback otherwise.
HOST_ENV = "TUNESERVE_GRPC_HOST"
PARSE_OFF_LOOP_BYTES = 256 * 1024  # as REST's infer: a large request's parsing is its own CPU, not the loop's
STOP_GRACE_S = 5.0  # RPCs in flight at shutdown get this long to finish


def arm(port: int, serve_host: str | None) -> None:
    """In BentoML's main process serving HTTP on `serve_host` (None: not serving; nothing to do): check that
    the gRPC port is free and hand the host to the workers. The workers bind with SO_REUSEPORT, which would
    also let a second server on this port take half of the first one's connections; so it is refused here,
    as a second bind of an HTTP port is."""
    if serve_host is None or not port:
        return
    address = _address(serve_host, port)
    family = socket.AF_INET6 if ":" in serve_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port left in TIME_WAIT is free
        try:
            probe.bind((serve_host, port))
        except OSError as e:
            raise OSError(f"cannot serve gRPC on {address} (TUNESERVE_GRPC_PORT={port}): {e.strerror}; another "
                          "server may be using it. Choose another port with --grpc-port, or 0 for no gRPC") from None
    os.environ[HOST_ENV] = serve_host


def host() -> str:
    return os.environ.get(HOST_ENV) or "127.0.0.1"


async def start(engine: Engine, keys: Keys, health: Callable[[], dict[str, Any]], port: int,
                on_refused: Callable[[str], None] = lambda rpc: None) -> grpc.aio.Server:
    """This worker's gRPC server on host():port, started in the running event loop; OSError when it cannot bind."""
    cfg = engine.config
    server = grpc.aio.server(options=[
        ("grpc.so_reuseport", 1),  # every worker binds the port
        ("grpc.max_receive_message_length", cfg.max_request_bytes),  # REST's body limit
        ("grpc.max_send_message_length", cfg.max_request_bytes),
    ])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(engine, keys, health, on_refused), server)
    address = _address(host(), port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:
        bound, reason = 0, str(e)
    else:
        reason = "the address is in use or not this machine's"
    if not bound:
        raise OSError(f"cannot serve gRPC on {address} (TUNESERVE_GRPC_PORT={port}): {reason}; choose another "
                      "port with --grpc-port, or 0 for no gRPC")
    await server.start()
    log.info("Open Inference Protocol over gRPC on %s (worker pid %d)", address, os.getpid())
    return server


async def stop(server: grpc.aio.Server) -> None:
    await server.stop(STOP_GRACE_S)


def _address(host_: str, port: int) -> str:
    return f"[{host_}]:{port}" if ":" in host_ and not host_.startswith("[") else f"{host_}:{port}"


Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def rpc(needs_key: bool = True) -> Callable[[Handler], Handler]:
    """An RPC's key check and error answers: RequestError -> its status code and REST's message (a refusal
    answered at its `answer_at`, as REST paces it); anything else -> logged, INTERNAL."""

    def wrap(handler: Handler) -> Handler:
        name = handler.__name__

        @functools.wraps(handler)
        async def answer(self: "Servicer", request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                if needs_key:
                    self.authenticate(name, context)
                return await handler(self, request, context)
            except RequestError as e:
                if e.answer_at is not None:
                    await asyncio.sleep(max(0.0, e.answer_at - time.monotonic()))
                retry = e.headers.get("Retry-After")
                if retry is not None:
                    context.set_trailing_metadata((("retry-after", retry),))
                await context.abort(grpc_codec.grpc_status(e.status), e.message)
            except Exception:  # noqa: BLE001 - the client gets a status, the log gets the traceback
                log.exception("gRPC %s failed", name)
                await context.abort(grpc.StatusCode.INTERNAL, "internal server error; the server log has the details")

        return answer

    return wrap


class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's RPCs that tuneserve serves; the others (shared memory, streaming, statistics, the
    repository, trace and log settings) answer UNIMPLEMENTED, from the generated base class."""

    def __init__(self, engine: Engine, keys: Keys, health: Callable[[], dict[str, Any]],
                 on_refused: Callable[[str], None]):
        self.engine, self.keys, self.health, self.on_refused = engine, keys, health, on_refused

    def authenticate(self, name: str, context: grpc.aio.ServicerContext) -> None:
        """RequestError 401 unless the metadata carries the API key (when one is set), as REST's front says it."""
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (context.invocation_metadata() or ())
                   if isinstance(v, str)]
        problem = self.keys.problem(API, headers)
        if problem is not None:
            what, which = problem
            raise RequestError(401, f"{what}: {SERVICE}/{name} needs the server's {which}")

    def _served(self, name: str, version: str) -> ModelVersion:
        return self.engine.model(name, version or None)

    @rpc(needs_key=False)
    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.health()["live"])

    @rpc(needs_key=False)
    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)  # this worker's engine exists: its models are loaded

    @rpc()
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        return grpc_codec.server_metadata(tuneserve.__version__)

    @rpc()
    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        try:
            self._served(request.name, request.version)
        except RequestError as e:
            if e.status != 404:
                raise
            return pb.ModelReadyResponse(ready=False)  # not served is not ready, as Triton answers it
        return pb.ModelReadyResponse(ready=True)

    @rpc()
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        model = self._served(request.name, request.version)
        return grpc_codec.model_metadata(model.name, model.version, oip.pixels_spec(model), len(model.labels),
                                         model.cam_grid)

    @rpc()
    async def ModelConfig(self, request: pb.ModelConfigRequest, context) -> pb.ModelConfigResponse:
        model = self._served(request.name, request.version)
        return grpc_codec.model_config(model.name, model.version, oip.pixels_spec(model), len(model.labels),
                                       self.engine.config.max_batch_images)

    @rpc()
    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        arrived = time.monotonic()  # grpcio has read the message: the bound covers parsing it
        # Admission's first look, before any parsing, as the HTTP protocol judges a request from its headers.
        refused = self.engine.refusal(1)
        if refused is not None:
            self.on_refused(f"/{SERVICE}/ModelInfer")
            raise refused
        model, cfg = self._served(request.model_name, request.model_version), self.engine.config
        parse = functools.partial(grpc_codec.parse_model_infer, request, oip.pixels_spec(model), cfg.max_batch_images,
                                  cfg.max_image_bytes)
        big = grpc_codec.payload_bytes(request) > PARSE_OFF_LOOP_BYTES
        parsed = await asyncio.to_thread(parse) if big else parse()
        probs, cams = await oip.infer(self.engine, model, parsed, arrived)
        return grpc_codec.model_infer_response(model.name, model.version, parsed, probs, model.labels, cams)
