"""The JSON API of `adder.serve`: answers, bad input, batching, and the command line.

The API tests talk HTTP to a real uvicorn serving the pretrained checkpoint
from a thread (`adder.serve.running`), so that body limits and connections are
the real ones; the batching tests drive `MicroBatcher` with a stand-in
predictor whose answers encode its input. The CLI runs in subprocesses.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import pathlib
import signal
import socket
import struct
import subprocess
import sys
import threading
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from adder import api
from adder import predict
from adder import serve

REPO = pathlib.Path(__file__).resolve().parents[1]

sys.path.insert(0, str(REPO / "experiments"))
from serve_load import digit_png  # noqa: E402  (the digits the load test sends)


def _png_bytes(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, "PNG")
  return buf.getvalue()


def b64(data: bytes) -> str:
  return base64.b64encode(data).decode()


def _png_claiming_size(width: int, height: int) -> bytes:
  """A 1x1 PNG whose header claims width x height: a decompression bomb's first bytes."""
  data = bytearray(_png_bytes(Image.new("L", (1, 1))))
  ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
  data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
  crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13]))
  data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
  return bytes(data)


@pytest.fixture(scope="module")
def predictor() -> predict.Predictor:
  return predict.load(predict.PRETRAINED)


@pytest.fixture(scope="module")
def url(predictor):
  with serve.running(serve.create_app(predictor, predict.PRETRAINED)) as u:
    yield u


@pytest.fixture(scope="module")
def client(url):
  with httpx.Client(base_url=url, timeout=30) as c:
    yield c


# --- answers ---------------------------------------------------------------------


@pytest.mark.parametrize("digit,number", [(1, 0), (7, 4), (0, 9)])
def test_png_answer_is_prepare_image_then_the_model(client, predictor, digit, number):
  png = digit_png(digit)
  r = client.post("/api/predict", json={"png": b64(png), "number": number, "return_image": True})
  assert r.status_code == 200, r.text
  body = r.json()
  assert (body["digit"], body["sum"]) == (digit, digit + number)
  # The same preparation as the CLI's, and the same probabilities as the Predictor's.
  prepared = predict.prepare_image(Image.open(io.BytesIO(png)))
  np.testing.assert_array_equal(np.array(body["image"], np.uint8), prepared)
  digit_probs, sum_probs = predictor.probabilities(prepared[None], np.array([number]))
  np.testing.assert_allclose(body["digit_probs"], digit_probs[0], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(body["sum_probs"], sum_probs[0], rtol=1e-5, atol=1e-7)
  assert len(body["digit_probs"]) == 10 and len(body["sum_probs"]) == 19


def test_data_url_png_and_array_agree(client):
  png = digit_png(7)
  prepared = predict.prepare_image(Image.open(io.BytesIO(png)))
  as_url = client.post("/api/predict", json={
      "png": "data:image/png;base64," + b64(png), "number": 2}).json()
  as_array = client.post("/api/predict", json={"array": prepared.tolist(), "number": 2}).json()
  assert "image" not in as_url  # only when asked for
  assert (as_url["digit"], as_url["sum"]) == (as_array["digit"], as_array["sum"]) == (7, 9)
  np.testing.assert_allclose(as_url["digit_probs"], as_array["digit_probs"], rtol=1e-6)


def test_batch_answers_in_order_as_singles(client):
  items = [{"png": b64(digit_png(d)), "number": n} for d, n in [(1, 5), (7, 0), (0, 3)]]
  items.append({"array": [[0] * 28] * 28, "number": 9})
  r = client.post("/api/predict", json={"items": items})
  assert r.status_code == 200, r.text
  answers = r.json()["predictions"]
  assert [(a["digit"], a["sum"]) for a in answers[:3]] == [(1, 6), (7, 7), (0, 3)]
  for item, answer in zip(items, answers):
    single = client.post("/api/predict", json=item).json()
    assert (single["digit"], single["sum"]) == (answer["digit"], answer["sum"])
    np.testing.assert_allclose(single["sum_probs"], answer["sum_probs"], rtol=1e-5, atol=1e-7)


def test_no_request_compiles(client, predictor):
  """Batches of every size up to the limit are padded to the sizes compiled at start-up."""
  item = {"array": [[0] * 28] * 28, "number": 1}
  for n in (1, 2, 5, 16, 17, api.MAX_BATCH):
    r = client.post("/api/predict", json={"items": [item] * n})
    assert r.status_code == 200 and len(r.json()["predictions"]) == n
  # pylint: disable-next=protected-access  (the jitted forward pass's compilations)
  assert predictor._forward._cache_size() == len(serve.BUCKETS)


def test_health_and_docs(client):
  health = client.get("/api/health").json()
  assert health["checkpoint"] == os.path.abspath(predict.PRETRAINED)
  assert health["weights"] == "swa" and health["backend"] == "cpu"
  assert health["batching"] == "off" and health["max_batch"] == api.MAX_BATCH
  spec = client.get("/openapi.json").json()
  assert {"/api/predict", "/api/health"} <= set(spec["paths"])
  docs = client.get("/docs")
  assert docs.status_code == 200
  # Every file the docs page loads comes from this server: it works offline.
  files = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
  assert files and all(f.startswith("/") for f in files), files
  for f in files:
    assert client.get(f).status_code == 200, f
  assert "openapi.json" in docs.text


def test_page_and_its_files_are_served_locally(client):
  page = client.get("/")
  assert page.status_code == 200 and 'id="pad"' in page.text
  for ident in ("pad", "number", "clear", "digit", "sum", "preview"):
    assert f'id="{ident}"' in page.text
  assert "http" not in page.text.replace("http-equiv", "")  # no other origin
  for path in ("/static/app.js", "/static/style.css"):
    r = client.get(path)
    assert r.status_code == 200 and len(r.text) > 100


# --- bad input --------------------------------------------------------------------

_GOOD_ARRAY = [[0] * 28] * 28
_SEVEN = b64(digit_png(7))

BAD_REQUESTS = [  # (name, httpx keyword arguments, status, words in the error line)
    ("malformed JSON", {"content": b'{"number": 3,', "headers": {"content-type": "application/json"}},
     400, "malformed JSON"),
    ("not an object", {"json": [1, 2]}, 422, "must be a JSON object"),
    ("empty body", {"content": b"", "headers": {"content-type": "application/json"}},
     422, "must be a JSON object"),
    ("a form, not JSON", {"data": {"number": "3"}}, 422, "application/json"),
    ("missing number", {"json": {"png": _SEVEN}}, 422, "number: Field required"),
    ("missing image", {"json": {"number": 3}}, 422, "exactly one image"),
    ("two images", {"json": {"number": 3, "png": _SEVEN, "array": _GOOD_ARRAY}}, 422,
     "exactly one image"),
    ("unknown field", {"json": {"number": 3, "png": _SEVEN, "colour": 1}}, 422,
     "colour: unknown field"),
    ("number 10", {"json": {"number": 10, "png": _SEVEN}}, 422, "number: Input should be less"),
    ("number -1", {"json": {"number": -1, "png": _SEVEN}}, 422, "number: Input should be greater"),
    ("number 3.5", {"json": {"number": 3.5, "png": _SEVEN}}, 422, "number: Input should be a valid integer"),
    ("number 3.0", {"json": {"number": 3.0, "png": _SEVEN}}, 422, "number: Input should be a valid integer"),
    ("number '3'", {"json": {"number": "3", "png": _SEVEN}}, 422, "number: Input should be a valid integer"),
    ("number true", {"json": {"number": True, "png": _SEVEN}}, 422, "number: Input should be a valid integer"),
    ("27 rows", {"json": {"number": 3, "array": _GOOD_ARRAY[:27]}}, 422, "array: must be 28 rows of 28"),
    ("27 columns", {"json": {"number": 3, "array": [[0] * 27] * 28}}, 422, "array: must be 28 rows of 28"),
    ("flat array", {"json": {"number": 3, "array": [0] * 784}}, 422, "array.0: Input should be a valid list"),
    ("value 256", {"json": {"number": 3, "array": [[256] * 28] * 28}}, 422, "array: grey values must be in 0..255"),
    ("value -1", {"json": {"number": 3, "array": [[0] * 27 + [-1]] * 28}}, 422, "0..255"),
    ("value NaN", {"content": b'{"number": 3, "array": [' + b",".join([b"[" + b",".join([b"NaN"] * 28) + b"]"] * 28) + b"]}",
                   "headers": {"content-type": "application/json"}}, 422, "0..255"),
    ("value a string", {"json": {"number": 3, "array": [["9"] * 28] * 28}}, 422, "array.0.0: Input should be a valid number"),
    ("png not base64", {"json": {"number": 3, "png": "not base64!"}}, 422, "png: not valid base64"),
    ("bytes not an image", {"json": {"number": 3, "png": b64(b"hello, world")}}, 422, "png: the bytes are not a PNG"),
    ("a JPEG, not a PNG", {"json": {"number": 3, "png": b64(b"\xff\xd8\xff\xe0" + b"\0" * 64)}}, 422,
     "not a PNG"),
    ("truncated PNG", {"json": {"number": 3, "png": b64(digit_png(7)[:200])}}, 422, "png: cannot decode"),
    ("other data URL", {"json": {"number": 3, "png": "data:image/gif;base64,R0lG"}}, 422, "data URL"),
    ("4097 px wide", {"json": {"number": 3, "png": b64(_png_bytes(Image.new("L", (4097, 1))))}}, 422,
     "4097x1 px, over 4096 px a side"),
    ("decompression bomb", {"json": {"number": 3, "png": b64(_png_claiming_size(50000, 50000))}},
     422, "over 4096 px a side"),
    ("blank image", {"json": {"number": 3, "png": b64(_png_bytes(Image.new("L", (280, 280), 255)))}},
     422, "png: no digit found"),
    ("body over 1 MiB", {"content": b" " * (api.MAX_BODY_BYTES + 1),
                         "headers": {"content-type": "application/json"}}, 413, "over 1048576 bytes"),
    ("streamed body over 1 MiB", {"content": iter([b" " * 65536] * 20),
                                  "headers": {"content-type": "application/json"}}, 413, "over 1048576 bytes"),
    ("batch over the limit", {"json": {"items": [{"number": 1, "array": _GOOD_ARRAY}] * (api.MAX_BATCH + 1)}},
     422, f"items: List should have at most {api.MAX_BATCH} items"),
    ("empty batch", {"json": {"items": []}}, 422, "items: List should have at least 1 item"),
    ("bad item in a batch", {"json": {"items": [{"number": 1, "array": _GOOD_ARRAY},
                                                {"number": 12, "array": _GOOD_ARRAY}]}},
     422, "items.1.number: Input should be less"),
    ("bad png in a batch", {"json": {"items": [{"number": 1, "array": _GOOD_ARRAY},
                                               {"number": 2, "png": b64(b"GIF89a")}]}},
     422, "items.1.png: the bytes are not a PNG"),
]


def test_bad_requests_get_one_line_then_a_good_one_is_answered(client):
  for name, kwargs, status, words in BAD_REQUESTS:
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("content"), type(iter([]))):  # a stream is used once
      kwargs["content"] = iter([b" " * 65536] * 20)
    r = client.post("/api/predict", **kwargs)
    assert r.status_code == status, (name, r.status_code, r.text)
    body = r.json()
    assert list(body) == ["error"], (name, body)
    assert words in body["error"] and "\n" not in body["error"], (name, body["error"])
  assert client.get("/nope").json() == {"error": "not found: /nope"}
  assert client.get("/api/predict").status_code == 405
  r = client.post("/api/predict", json={"png": _SEVEN, "number": 6})
  assert r.status_code == 200 and (r.json()["digit"], r.json()["sum"]) == (7, 13)


# --- batching ---------------------------------------------------------------------


class _EchoPredictor:
  """Stands in for a Predictor: digit probabilities one-hot at number, sum at image[0, 0].

  It records each batch's size, and its first call waits for `release`, so
  that requests queue up behind it.
  """

  def __init__(self):
    self.sizes: list[int] = []
    self.release = threading.Event()

  def probabilities(self, images, numbers):
    self.release.wait(10)
    self.sizes.append(len(numbers))
    return (np.eye(10, dtype=np.float32)[numbers],
            np.eye(19, dtype=np.float32)[images[:, 0, 0].astype(int)])


def _requests(sizes: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
  """Requests of these sizes whose items are numbered 0, 1, 2, ... (mod 10 / 19)."""
  out, k = [], 0
  for n in sizes:
    ids = np.arange(k, k + n)
    images = np.zeros((n, 28, 28), np.float32)
    images[:, 0, 0] = ids % 19
    out.append((images, (ids % 10).astype(np.int32)))
    k += n
  return out


def test_runner_pads_to_buckets_and_splits_large_batches():
  fake = _EchoPredictor()
  fake.release.set()
  runner = serve.ModelRunner(fake, buckets=(1, 4, 16))
  ((images, numbers),) = _requests([37])
  digit_probs, sum_probs = runner.run(images, numbers)
  assert fake.sizes == [16, 16, 16]  # 16 + 16 + 5 padded to 16
  np.testing.assert_array_equal(digit_probs.argmax(-1), numbers)
  np.testing.assert_array_equal(sum_probs.argmax(-1), images[:, 0, 0])
  runner.run(images[:3], numbers[:3])
  assert fake.sizes[-1] == 4
  runner.close()


def test_micro_batcher_joins_waiting_requests_and_answers_each_its_own():
  fake = _EchoPredictor()
  runner = serve.ModelRunner(fake, buckets=(1, 4, 16))
  batcher = serve.MicroBatcher(runner, max_batch=16)
  requests = _requests([1, 3, 2, 5, 4, 8, 1])

  async def scenario():
    batcher.start()
    first = asyncio.create_task(batcher(*requests[0]))
    await asyncio.sleep(0.05)  # the first call is running (and blocked)
    rest = [asyncio.create_task(batcher(*r)) for r in requests[1:]]
    await asyncio.sleep(0.05)
    fake.release.set()
    answers = await asyncio.gather(first, *rest)
    await batcher.stop()
    return answers

  answers = asyncio.run(scenario())
  runner.close()
  # 1 alone; then 3+2+5+4 = 14 items; 8 does not fit beside them, so 8+1.
  assert fake.sizes == [1, 16, 16]
  for (images, numbers), (digit_probs, sum_probs) in zip(requests, answers):
    np.testing.assert_array_equal(digit_probs.argmax(-1), numbers)
    np.testing.assert_array_equal(sum_probs.argmax(-1), images[:, 0, 0])


def test_concurrent_clients_get_their_own_answers(predictor):
  """Many clients at once, with and without micro-batching: each answer is its request's."""
  items = [{"png": b64(digit_png(d)), "number": n} for d in (0, 1, 7) for n in range(10)]
  for batching in serve.BATCHING:
    app = serve.create_app(predictor, predict.PRETRAINED, batching=batching)
    with serve.running(app) as u, httpx.Client(base_url=u, timeout=30) as c:
      answers = [None] * len(items)

      def ask(i):
        answers[i] = c.post("/api/predict", json=items[i]).json()

      threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(items))]
      for t in threads:
        t.start()
      for t in threads:
        t.join()
    sums = [a["sum"] for a in answers]
    assert sums == [d + n for d in (0, 1, 7) for n in range(10)], batching


# --- command line -----------------------------------------------------------------


def _serve_cli(*args: str, **kwargs) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.Popen([sys.executable, "-m", "adder.serve", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture()
def busy_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield str(s.getsockname()[1])


@pytest.mark.parametrize("case", ["bad port", "bad batching", "missing checkpoint", "port in use"])
def test_cli_bad_input_is_one_error_line(case, tmp_path, busy_port):
  args = {"bad port": ["--port", "http"], "bad batching": ["--batching", "maybe"],
          "missing checkpoint": [str(tmp_path / "nowhere")],
          "port in use": ["--port", busy_port]}[case]
  proc = _serve_cli(*args)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 2, (case, out, err)
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:"), (case, err)
  assert "Traceback" not in err and out == ""


def test_cli_serves_then_stops_on_ctrl_c():
  proc = _serve_cli("--port", "0")
  try:
    line = proc.stdout.readline()
    assert line.startswith("adder.serve: http://127.0.0.1:"), (line, proc.stderr.read())
    url = line.split()[1]
    health = httpx.get(url + "api/health", timeout=30).json()
    assert health["weights"] == "swa" and health["batching"] == "off"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == 0, err
  assert "Traceback" not in err and out.strip() == ""
