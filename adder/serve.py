"""The drawing page and JSON API of a checkpoint: ``python -m adder.serve``.

``python -m adder.serve [CHECKPOINT] [--host 127.0.0.1] [--port 8000]
[--weights swa|final] [--batching micro|off]`` loads CHECKPOINT (default: the
repository's pretrained run, `adder.predict.PRETRAINED`), compiles the model
for every batch size in `BUCKETS`, prints one line with the URL and serves,
with uvicorn, until Ctrl-C:

* ``GET /``: the page (``adder/static/``, no other origin): draw a digit,
  choose the integer, read both heads' answers and probabilities and the
  28x28 image the model saw.
* ``POST /api/predict``: one item or a batch (`adder.api`); ``GET
  /api/health``: checkpoint, weights, JAX backend; ``GET /docs``: the OpenAPI
  docs (Swagger UI, its files served from the ``swagger-ui-bundle`` package, so
  they work offline too) of ``/openapi.json``.

One worker thread (`ModelRunner`) does a request's work: it decodes and
prepares the images and runs the model, so JAX is only ever called from it and
the event loop only reads and answers HTTP. Every batch is padded to the next
size in `BUCKETS`, so no request compiles. With ``--batching off`` (the
default) each request is one model call; with ``micro`` the requests that wait
for the model while it runs are joined into its next call (`MicroBatcher`).
``experiments/serve_load.py`` measures both (BENCHMARKS.md): on single
requests, the page's, they were even in throughput and only ``off`` kept every
round's p99 under 50 ms; ``micro`` answered batch requests faster. Every 4xx answer is ``{"error": "<one
line>"}``; bodies over `adder.api.MAX_BODY_BYTES` are refused by their
Content-Length before being read, or as soon as the stream passes the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import jax
import numpy as np
import uvicorn
from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from swagger_ui_bundle import swagger_ui_path

from adder import api
from adder import checkpoint as checkpoint_lib
from adder import predict

BUCKETS = (1, 4, 16, api.MAX_BATCH)  # batch sizes compiled at start-up, ascending
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
BATCHING = ("micro", "off")
_BAD_INPUT = {status: {"model": api.ErrorBody} for status in (400, 413, 422)}

Probabilities = tuple[np.ndarray, np.ndarray]  # float32 (N, 10) and (N, 19)


class ModelRunner:
  """A `Predictor` behind one worker thread, on batches padded to the compiled sizes."""

  def __init__(self, predictor: predict.Predictor, buckets: Sequence[int] = BUCKETS):
    self.predictor = predictor
    self.buckets = tuple(sorted(buckets))
    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adder-model")

  def warm_up(self) -> None:
    """Compile the forward pass for every bucket size (about a second each on a CPU)."""
    for size in self.buckets:
      self.run(np.zeros((size, api.SIDE, api.SIDE), np.float32), np.zeros(size, np.int32))

  def run(self, images: np.ndarray, numbers: np.ndarray) -> Probabilities:
    """Probabilities for float32 (N, 28, 28) images and int32 (N,) numbers, any N >= 1."""
    digit_probs, sum_probs = [], []
    top = self.buckets[-1]
    for start in range(0, len(numbers), top):
      chunk_images, chunk_numbers = images[start:start + top], numbers[start:start + top]
      n = len(chunk_numbers)
      pad = next(size for size in self.buckets if size >= n) - n
      d, s = self.predictor.probabilities(
          np.concatenate([chunk_images, np.zeros((pad, api.SIDE, api.SIDE), np.float32)]),
          np.concatenate([chunk_numbers, np.zeros(pad, np.int32)]))
      digit_probs.append(d[:n])
      sum_probs.append(s[:n])
    return np.concatenate(digit_probs), np.concatenate(sum_probs)

  def answer(self, body: Union[api.Single, api.Batch]) -> tuple[np.ndarray, Probabilities]:
    """A request's prepared images (N, 28, 28) and probabilities: one model call."""
    images, numbers = api.prepare_all(body)
    return images, self.run(images, numbers)

  async def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on the worker thread, in the order submitted."""
    return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

  def close(self) -> None:
    self._executor.shutdown(wait=True)


class MicroBatcher:
  """Requests that wait for the model while it runs share its next call.

  There is no waiting window: a lone request is run at once; under load, the
  requests queued during one call (up to `max_batch` items) form the next.
  """

  def __init__(self, runner: ModelRunner, max_batch: int):
    self._runner = runner
    self._max_batch = max_batch
    self._queue: Optional[asyncio.Queue] = None
    self._task: Optional[asyncio.Task] = None

  def start(self) -> None:
    """Start the batching task on the running event loop."""
    self._queue = asyncio.Queue()
    self._task = asyncio.create_task(self._serve())

  async def stop(self) -> None:
    if self._task is not None:
      self._task.cancel()
      with contextlib.suppress(asyncio.CancelledError):
        await self._task

  async def __call__(self, images: np.ndarray, numbers: np.ndarray) -> Probabilities:
    future = asyncio.get_running_loop().create_future()
    self._queue.put_nowait((images, numbers, future))
    return await future

  async def _serve(self) -> None:
    carry = None  # a request that did not fit into the last call
    while True:
      jobs = [carry if carry is not None else await self._queue.get()]
      carry, size = None, len(jobs[0][1])
      while not self._queue.empty():
        job = self._queue.get_nowait()
        if size + len(job[1]) > self._max_batch:
          carry = job
          break
        jobs.append(job)
        size += len(job[1])
      await self._run(jobs)

  async def _run(self, jobs: list) -> None:
    try:
      digit_probs, sum_probs = await self._runner.submit(
          self._runner.run, np.concatenate([j[0] for j in jobs]),
          np.concatenate([j[1] for j in jobs]))
    except Exception as e:  # pylint: disable=broad-except  (handed to each waiting request)
      for *_, future in jobs:
        if not future.done():
          future.set_exception(e)
      return
    start = 0
    for _, numbers, future in jobs:
      end = start + len(numbers)
      if not future.done():  # a request whose client left is cancelled
        future.set_result((digit_probs[start:end], sum_probs[start:end]))
      start = end


class BodyLimit:
  """ASGI middleware: bodies over `max_bytes` get a 413 before the app reads them whole."""

  def __init__(self, app: Any, max_bytes: int):
    self.app = app
    self.max_bytes = max_bytes

  async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
      await self.app(scope, receive, send)
      return
    message = f"the body is over {self.max_bytes} bytes"
    length = dict(scope["headers"]).get(b"content-length")
    if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
      await JSONResponse({"error": message}, status_code=413)(scope, receive, send)
      return
    received = 0

    async def capped_receive() -> dict:
      nonlocal received
      event = await receive()
      if event["type"] == "http.request":
        received += len(event.get("body", b""))
        if received > self.max_bytes:  # FastAPI lets an HTTPException from here through
          raise HTTPException(413, message)
      return event

    await self.app(scope, capped_receive, send)


def _error(status: int, message: str) -> JSONResponse:
  return JSONResponse({"error": message}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
  """Every 4xx answer as ``{"error": "<one line>"}``."""

  @app.exception_handler(RequestValidationError)
  async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    status = 400 if errors and errors[0].get("type") == "json_invalid" else 422
    return _error(status, api.error_line(errors, exc.body))

  @app.exception_handler(api.BadInput)
  async def _bad_input(request: Request, exc: api.BadInput) -> JSONResponse:
    return _error(422, str(exc))

  @app.exception_handler(HTTPException)
  async def _http(request: Request, exc: HTTPException) -> JSONResponse:
    message = {404: f"not found: {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}
    return _error(exc.status_code, message.get(exc.status_code, str(exc.detail)))


_EXAMPLES = {
    "array": {"summary": "one 28x28 array (MNIST form)",
              "value": {"array": [[0] * api.SIDE] * api.SIDE, "number": 3}},
    "png": {"summary": "one PNG, base64, with the prepared image back",
            "value": {"png": "iVBORw0KGgo...", "number": 3, "return_image": True}},
    "batch": {"summary": "a batch",
              "value": {"items": [{"png": "iVBORw0KGgo...", "number": 3},
                                  {"array": [[0] * api.SIDE] * api.SIDE, "number": 9}]}},
}


def create_app(predictor: predict.Predictor, checkpoint: str, batching: str = "off",
               buckets: Sequence[int] = BUCKETS) -> FastAPI:
  """The app, its model compiled for every size in `buckets` (so this takes seconds).

  Args:
    predictor: the loaded checkpoint (`adder.predict.load`).
    checkpoint: its path, reported by ``/api/health``.
    batching: ``"micro"`` (requests waiting for the model share its next call)
      or ``"off"`` (one model call per request).
    buckets: ascending batch sizes to compile; the last is the largest call.
  """
  if batching not in BATCHING:
    raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
  runner = ModelRunner(predictor, buckets)
  runner.warm_up()
  batcher = MicroBatcher(runner, runner.buckets[-1]) if batching == "micro" else None

  @contextlib.asynccontextmanager
  async def lifespan(_: FastAPI):
    if batcher is not None:
      batcher.start()
    yield
    if batcher is not None:
      await batcher.stop()
    runner.close()

  app = FastAPI(title="adder", version="0.1.0", lifespan=lifespan, docs_url=None,
                redoc_url=None, description="Read the digit in an image and add an integer 0-9 to it.")
  app.add_middleware(BodyLimit, max_bytes=api.MAX_BODY_BYTES)
  _add_error_handlers(app)
  health = api.Health(
      status="ok", checkpoint=os.path.abspath(checkpoint), weights=predictor.weights,
      backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
      batching=batching, max_batch=api.MAX_BATCH, compiled_batch_sizes=list(runner.buckets))
  _add_routes(app, runner, batcher, health)
  return app


def _add_routes(app: FastAPI, runner: ModelRunner, batcher: Optional[MicroBatcher],
                health: api.Health) -> None:
  """The page, its files, the prediction and the health routes."""

  @app.post("/api/predict", response_model=Union[api.Prediction, api.BatchPrediction],
            response_model_exclude_none=True, responses=_BAD_INPUT)
  async def predict_route(
      body: api.PredictRequest = Body(openapi_examples=_EXAMPLES),
  ) -> Union[api.Prediction, api.BatchPrediction]:
    """Digit, sum and both heads' probabilities, for one item or a batch."""
    if batcher is None:
      images, (digit_probs, sum_probs) = await runner.submit(runner.answer, body)
    else:
      images, numbers = await runner.submit(api.prepare_all, body)
      digit_probs, sum_probs = await batcher(images, numbers)
    answers = api.predictions(digit_probs, sum_probs, images if body.return_image else None)
    return api.BatchPrediction(predictions=answers) if isinstance(body, api.Batch) else answers[0]

  @app.get("/api/health", response_model=api.Health)
  async def health_route() -> api.Health:
    """The checkpoint, its weights and the JAX backend in use."""
    return health

  @app.get("/", include_in_schema=False)
  async def page() -> FileResponse:
    return FileResponse(os.path.join(STATIC_DIR, "index.html"))

  @app.get("/docs", include_in_schema=False)
  async def docs() -> Any:
    return get_swagger_ui_html(
        openapi_url=app.openapi_url, title="adder: API",
        swagger_js_url="/docs-files/swagger-ui-bundle.js",
        swagger_css_url="/docs-files/swagger-ui.css",
        swagger_favicon_url="/docs-files/favicon-32x32.png")

  app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
  app.mount("/docs-files", StaticFiles(directory=str(swagger_ui_path)), name="docs-files")


# --- command line ---


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = predict.OneLineErrorParser(
      prog="python -m adder.serve",
      description="Serve the drawing page and the JSON API of an adder checkpoint.")
  p.add_argument("checkpoint", nargs="?", default=predict.PRETRAINED, metavar="CHECKPOINT",
                 help="a training workdir or its checkpoint/ (default: the pretrained run "
                      f"in {predict.PRETRAINED})")
  p.add_argument("--host", default="127.0.0.1",
                 help="address to listen on (default 127.0.0.1: this machine only)")
  p.add_argument("--port", type=_port, default=8000,
                 help="TCP port (default 8000; 0 picks a free one, shown in the URL line)")
  p.add_argument("--weights", choices=checkpoint_lib.WEIGHT_SETS, default=None,
                 help="weight set to use (default: swa when the checkpoint has it, else final)")
  p.add_argument("--batching", choices=BATCHING, default="off",
                 help="off (default): one model call per request; micro: requests "
                      "waiting for the model share its next call, faster for batch "
                      "requests (BENCHMARKS.md)")
  return p.parse_args(argv)


def _port(text: str) -> int:
  if not text.isdigit() or int(text) > 65535:
    raise argparse.ArgumentTypeError(f"must be an integer 0-65535, got {text!r}")
  return int(text)


def _listen(host: str, port: int) -> socket.socket:
  """A listening TCP socket on (host, port); OSError if the address cannot be had."""
  family, kind, proto, _, address = socket.getaddrinfo(
      host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
  sock = socket.socket(family, kind, proto)
  try:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(128)
  except OSError:
    sock.close()
    raise
  return sock


def _url(sock: socket.socket) -> str:
  host, port = sock.getsockname()[:2]
  return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _server(app: FastAPI) -> uvicorn.Server:
  return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
  """Serve `app` from a background thread inside a ``with`` block; yields its URL.

  For tests and notebooks; port 0 takes a free port.
  """
  sock = _listen(host, port)
  server = _server(app)
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  try:
    while not server.started:
      if not thread.is_alive():
        raise RuntimeError("the server stopped while starting")
      time.sleep(0.01)
    yield _url(sock)
  finally:
    server.should_exit = True
    thread.join()
    sock.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The CLI; returns the exit status (0 after Ctrl-C, or 2 after one ``error:`` line)."""
  args = parse_args(argv)
  try:
    predictor = predict.load(args.checkpoint, args.weights)
    sock = _listen(args.host, args.port)
  except checkpoint_lib.CheckpointError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  except OSError as e:
    print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}",
          file=sys.stderr, flush=True)
    return 2
  app = create_app(predictor, args.checkpoint, args.batching)
  print(f"adder.serve: {_url(sock)}  ({predictor.weights} weights of "
        f"{os.path.abspath(args.checkpoint)}, JAX {jax.default_backend()}, "
        f"batching {args.batching}; Ctrl-C stops)", flush=True)
  try:
    _server(app).run(sockets=[sock])
  except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, after shutting down
    pass
  return 0


if __name__ == "__main__":
  sys.exit(main())
