"""Load test of ``python -m adder.serve`` on 127.0.0.1, with and without micro-batching.

Command (from the repository root; it writes its section of BENCHMARKS.md):

  python experiments/serve_load.py --write BENCHMARKS.md

last run: see BENCHMARKS.md (section "Server under load").

The script starts one server per batching mode (``python -m adder.serve
CHECKPOINT --port 0 --batching MODE`` for ``off`` and ``micro``, the
pretrained checkpoint by default), waits for them, and sends, from
``--clients`` concurrent clients (threads, each with one keep-alive
connection), to each server in turn, in ``--rounds`` rounds that alternate the
servers (so that both see the same changes in a shared machine's load):

* ``--requests`` single requests in all, each one PNG of a digit drawn on a
  280x280 canvas and a number, as the page sends them (decoding and
  preparation included);
* ``--batch-requests`` batches of ``--batch-size`` 28x28 arrays in all.

It reports, over all rounds, requests/s, items/s, p50/p99 latency (from
sending a request to reading its whole answer), errors (an HTTP status other
than 200, a failed connection, or an answer that differs from the one the same
request got alone before the load) and each server's peak RSS (``VmHWM`` of
its process, read at the end). Then it stops the servers with Ctrl-C (SIGINT).
It ends on its own: a fixed number of requests, each with a 60 s timeout.

The clients run on the same machine as the server and share its cores, so the
figures are those of the pair; on a shared machine they move with its load.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import http.client
import io
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from typing import Optional
from urllib.parse import urlsplit

import numpy as np
from PIL import Image, ImageDraw

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark import cpu_model, usable_cores, write_section  # noqa: E402

MODES = ("off", "micro")
TIMEOUT_S = 60.0
# Digits drawn as strokes on a 280x280 canvas (y down), as on the page.
STROKES = {
    1: [[(140, 40), (140, 240)]],
    4: [[(170, 40), (70, 175), (215, 175)], [(170, 40), (170, 245)]],
    7: [[(80, 60), (200, 60), (120, 230)]],
    0: [[(140 + 60 * math.cos(t), 140 + 90 * math.sin(t))
         for t in np.linspace(0, 2 * math.pi, 40)]],
}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python experiments/serve_load.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", default=None, help="default: the pretrained run")
  p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
  p.add_argument("--requests", type=int, default=3000, help="single requests per mode")
  p.add_argument("--batch-requests", type=int, default=300, help="batch requests per mode")
  p.add_argument("--rounds", type=int, default=5, help="rounds alternating the modes")
  p.add_argument("--batch-size", type=int, default=32, help="items per batch request")
  p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
  p.add_argument("--write", metavar="PATH", default=None,
                 help="put the table into PATH between its markers (else print it)")
  a = p.parse_args(argv)
  if min(a.clients, a.requests, a.batch_requests, a.batch_size, a.rounds) < 1:
    p.error("--clients, --requests, --batch-requests, --batch-size and --rounds must be >= 1")
  return a


# --- payloads --------------------------------------------------------------------


def digit_png(digit: int, size: tuple[int, int] = (280, 280)) -> bytes:
  """PNG bytes of `digit`'s `STROKES` drawn black on white, as the page's canvas sends it."""
  img = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(img)
  for stroke in STROKES[digit]:
    draw.line(stroke, fill="black", width=16, joint="curve")
  buf = io.BytesIO()
  img.save(buf, "PNG")
  return buf.getvalue()


def _png_b64(digit: int) -> str:
  return base64.b64encode(digit_png(digit)).decode()


def payloads(batch_size: int) -> dict[str, list[bytes]]:
  """Request bodies: "single" (one canvas PNG each), "batch" (`batch_size` arrays each)."""
  rng = np.random.default_rng(0)
  single = [json.dumps({"png": _png_b64(d), "number": n}).encode()
            for d in STROKES for n in (0, 3, 9)]
  batch = []
  for _ in range(4):
    items = [{"array": rng.integers(0, 256, (28, 28)).tolist(), "number": int(n)}
             for n in rng.integers(0, 10, batch_size)]
    batch.append(json.dumps({"items": items}).encode())
  return {"single": single, "batch": batch}


# --- the server ------------------------------------------------------------------


def start_server(checkpoint: Optional[str], mode: str) -> tuple[subprocess.Popen, str]:
  """``python -m adder.serve`` on a free port of 127.0.0.1; (process, URL)."""
  cmd = [sys.executable, "-m", "adder.serve", "--port", "0", "--batching", mode]
  if checkpoint:
    cmd.insert(3, checkpoint)
  proc = subprocess.Popen(cmd, cwd=_REPO_ROOT, stdout=subprocess.PIPE, text=True)
  line = proc.stdout.readline()  # the URL line, once the model is compiled
  if not line.startswith("adder.serve: http://"):
    proc.kill()
    raise SystemExit(f"error: the server did not start: {line.strip() or proc.wait()}")
  return proc, line.split()[1]


def peak_rss_mib(pid: int) -> float:
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def stop_server(proc: subprocess.Popen) -> None:
  proc.send_signal(signal.SIGINT)
  try:
    proc.wait(timeout=30)
  except subprocess.TimeoutExpired:
    proc.kill()


# --- the clients -----------------------------------------------------------------


def _post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
  conn.request("POST", "/api/predict", body, {"Content-Type": "application/json"})
  response = conn.getresponse()
  return response.status, response.read()


def _answers(raw: bytes) -> list[tuple[int, int]]:
  """(digit, sum) of each item of an answer, single or batch."""
  body = json.loads(raw)
  return [(a["digit"], a["sum"]) for a in body.get("predictions", [body])]


def expected_answers(url: str, bodies: list[bytes]) -> list[list[tuple[int, int]]]:
  """Each body's answer, asked alone (also the server's warm-up)."""
  u = urlsplit(url)
  conn = http.client.HTTPConnection(u.hostname, u.port, timeout=TIMEOUT_S)
  out = []
  for body in bodies:
    status, raw = _post(conn, body)
    if status != 200:
      raise SystemExit(f"error: a load-test request was refused ({status}): {raw[:200]!r}")
    out.append(_answers(raw))
  conn.close()
  return out


def run_load(url: str, bodies: list[bytes], expected: list, n: int, clients: int) -> dict:
  """`n` requests (bodies in turn) from `clients` threads: wall seconds, latencies, errors."""
  u = urlsplit(url)
  lock = threading.Lock()
  next_index = iter(range(n))
  latencies, errors = [], [0]

  def client():
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=TIMEOUT_S)
    while True:
      with lock:
        i = next(next_index, None)
      if i is None:
        break
      k = i % len(bodies)
      start = time.perf_counter()
      try:
        status, raw = _post(conn, bodies[k])
        ok = status == 200 and _answers(raw) == expected[k]
      except (OSError, http.client.HTTPException, ValueError, KeyError):
        ok = False
        conn.close()
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=TIMEOUT_S)
      elapsed = time.perf_counter() - start
      with lock:
        latencies.append(elapsed)
        errors[0] += not ok
    conn.close()

  threads = [threading.Thread(target=client) for _ in range(clients)]
  start = time.perf_counter()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return {"seconds": time.perf_counter() - start, "latencies": latencies, "errors": errors[0]}


def summary(parts: list[dict], items: int) -> dict:
  """One table row from the rounds of one mode and workload."""
  ms = np.concatenate([p["latencies"] for p in parts]) * 1000
  seconds = sum(p["seconds"] for p in parts)
  return {"requests": len(ms), "rps": len(ms) / seconds, "items_per_s": len(ms) * items / seconds,
          "errors": sum(p["errors"] for p in parts), "items": items,
          "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
          "p99_rounds_ms": [float(np.percentile(p["latencies"], 99)) * 1000 for p in parts]}


def measure(a: argparse.Namespace, bodies: dict[str, list[bytes]]) -> list[dict]:
  """Both workloads against one server per mode, in rounds alternating the servers."""
  servers = {}
  try:
    for mode in a.modes:
      servers[mode] = start_server(a.checkpoint, mode)
    expected = {(mode, w): expected_answers(url, bodies[w])
                for mode, (_, url) in servers.items() for w in bodies}
    workloads = {"single": (a.requests, 1), "batch": (a.batch_requests, a.batch_size)}
    parts = {key: [] for key in expected}
    for r in range(a.rounds):
      for workload, (n, _) in workloads.items():
        share = n // a.rounds + (r < n % a.rounds)
        for mode, (_, url) in servers.items():
          parts[mode, workload].append(run_load(
              url, bodies[workload], expected[mode, workload], share, a.clients))
    rss = {mode: peak_rss_mib(proc.pid) for mode, (proc, _) in servers.items()}
  finally:
    for proc, _ in servers.values():
      stop_server(proc)
  rows = []
  for (mode, workload), runs in parts.items():
    row = summary(runs, workloads[workload][1])
    row.update(mode=mode, workload=workload, clients=a.clients, peak_rss_mib=rss[mode])
    print(f"{mode:5s} {workload:6s} {row['rps']:8.1f} req/s  p50 {row['p50_ms']:6.1f} ms"
          f"  p99 {row['p99_ms']:6.1f} ms  errors {row['errors']}", flush=True)
    rows.append(row)
  return rows


# --- the report ------------------------------------------------------------------


def machine() -> str:
  """The CPU model, its cores and the usable ones, and the OS, for the table."""
  return f"{cpu_model()}, {os.cpu_count()} cores ({usable_cores()} usable), {platform.system()}"


def markdown(a: argparse.Namespace, rows: list[dict], command: str) -> str:
  """The section of BENCHMARKS.md: how it was made, the table, which mode won."""
  singles = {r["mode"]: r for r in rows if r["workload"] == "single"}
  winner = max(singles, key=lambda m: singles[m]["rps"])
  lines = [
      "## Server under load (`python -m adder.serve`)",
      "",
      f"- Command (from the repository root): `{command}`",
      f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
      f"- Machine: {machine()}; server and clients on the same machine, over 127.0.0.1",
      f"- Load: {a.clients} concurrent clients (threads, one keep-alive connection each), "
      f"{a.rounds} rounds alternating the two servers (figures over all rounds); "
      f"single = one 280x280 PNG drawn as on the page + a number (decoding and "
      f"`adder.predict.prepare_image` included), batch = {a.batch_size} 28x28 arrays",
      "- errors: HTTP status other than 200, failed connection, or an answer unlike "
      "the one the same request got alone; peak RSS: the server process's `VmHWM`",
      "",
      "| batching | request | requests | clients | requests/s | items/s | p50 ms | p99 ms "
      "| p99 ms by round | errors | server peak RSS (MiB) |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    kind = "single PNG" if r["workload"] == "single" else f"batch of {r['items']} arrays"
    lines.append(f"| {r['mode']} | {kind} | {r['requests']:,} | {r['clients']} | {r['rps']:,.1f} "
                 f"| {r['items_per_s']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
                 f"| {' / '.join(f'{v:.0f}' for v in r['p99_rounds_ms'])} "
                 f"| {r['errors']} | {r['peak_rss_mib']:,.0f} |")
  if len(singles) == len(MODES):
    other = next(m for m in singles if m != winner)
    w, o = singles[winner], singles[other]
    lines += ["", f"Single requests, more requests/s in this run: **{winner}** ({w['rps']:,.0f} "
              f"requests/s, p50 {w['p50_ms']:.1f} ms, p99 {w['p99_ms']:.1f} ms; {other}: "
              f"{o['rps']:,.0f} requests/s, p50 {o['p50_ms']:.1f} ms, p99 {o['p99_ms']:.1f} ms). "
              f"With {a.clients} clients always waiting on an answer, the mean latency is "
              "clients / throughput, so the throughput decides it; the p99 by round shows "
              "how far the tail moves with the rest of the machine's load."]
  return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
  a = parse_args(argv)
  command = "python experiments/serve_load.py " + " ".join(sys.argv[1:] if argv is None else argv)
  bodies = payloads(a.batch_size)
  rows = measure(a, bodies)
  text = markdown(a, rows, command.strip())
  if a.write:
    write_section(a.write, "serve", text)
    print(f"wrote the serve section of {a.write}")
  else:
    print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
