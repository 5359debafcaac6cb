"""Load test of ``defectscope serve`` on loopback: throughput, latency, errors, 503s, memory, overhead.

    PYTHONPATH=src python benchmarks/serve_load.py                        # padim, 64 px, ~2 minutes
    PYTHONPATH=src python benchmarks/serve_load.py --size 128 --requests 600 --rss-requests 5000

Fits ``--model`` on the synthetic set's ``fabric`` images (RGB PNG files at ``--size``), calibrates
and saves it, then starts the service as a subprocess (``defectscope serve``) on a free port of
127.0.0.1 and drives it with 1, 4 and 16 concurrent clients (threads with keep-alive connections,
each posting the raw bytes of a PNG file to ``/v1/models/fabric/predict``), ``--requests`` requests
per level. Nothing leaves the machine; every phase is bounded in count and by ``--time-limit``.

Reported (printed as a Markdown table, and written to ``--out`` as JSON):

* per client count: throughput (requests/s), p50 / p99 latency (ms), errors (any non-200);
* the micro-batching gain: 16 clients with ``--max-batch`` against a service started with
  ``--max-batch 1``;
* overload: ``--overload-clients`` clients against a service with ``--queue-size
  --overload-queue``: the share of 503 answers (and that nothing else failed);
* memory: the service's RSS before and after ``--rss-requests`` requests;
* overhead: one request at a time to the service against the in-process Inferencer's
  ``predict(path)`` on the same files (decoding included in both), interleaved call by call; the
  in-process calls run in a worker thread as the service's forward pass does, and from the main
  thread too (reported: under CPU contention, torch's OpenMP threads made main-thread calls far
  slower on our shared machine);
* warm-up: seconds from starting the process to ``/readyz`` answering 200.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Service:
    """``defectscope serve`` in a subprocess on a free loopback port."""

    def __init__(self, model_dir: Path, threads: int, **options) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "defectscope.cli", "serve", f"fabric={model_dir}", "--host", "127.0.0.1",
                "--port", str(self.port), "--log-level", "warning"]
        for k, v in options.items():
            argv += [f"--{k.replace('_', '-')}", str(v)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = t0 + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.perf_counter() > deadline:
                raise TimeoutError("the service was not ready after 120 s")
            time.sleep(0.05)
        self.ready_s = time.perf_counter() - t0

    def rss(self) -> float:
        return rss_mb(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def drive(port: int, bodies: list[bytes], clients: int, n: int, deadline: float, backoff_s: float = 0.0) -> dict:
    """``n`` requests spread over ``clients`` threads (each with one keep-alive connection); a client
    answered 503 waits ``backoff_s`` before its next request."""
    lat: list[float] = []
    codes: dict[int, int] = {}
    lock = threading.Lock()
    counter = iter(range(n))
    start = threading.Barrier(clients + 1)

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine, seen = [], {}
        start.wait()
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            body = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/models/fabric/predict", body=body, headers={"Content-Type": "image/png"})
                r = conn.getresponse()
                r.read()
                code = r.status
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            except OSError:
                code = -1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            mine.append(time.perf_counter() - t0)
            seen[code] = seen.get(code, 0) + 1
            if code == 503 and backoff_s:
                time.sleep(backoff_s)
        conn.close()
        with lock:
            lat.extend(mine)
            for c, m in seen.items():
                codes[c] = codes.get(c, 0) + m

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = sorted(lat)
    done = len(lat)

    def pct(q):
        return ok[min(len(ok) - 1, int(round(q * (len(ok) - 1))))] * 1e3 if ok else float("nan")

    return {"clients": clients, "requests": done, "seconds": wall, "throughput_rps": done / wall if wall else 0.0,
            "p50_ms": pct(0.5), "p99_ms": pct(0.99), "codes": {str(k): v for k, v in sorted(codes.items())},
            "errors": sum(v for k, v in codes.items() if k != 200), "complete": done == n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="padim")
    ap.add_argument("--size", type=int, default=64, help="model input side and image side (default 64)")
    ap.add_argument("--requests", type=int, default=400, help="requests per client level (default 400)")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--queue-size", type=int, default=64)
    ap.add_argument("--overload-clients", type=int, default=32)
    ap.add_argument("--overload-queue", type=int, default=8)
    ap.add_argument("--backoff-ms", type=float, default=20, help="overload: a client answered 503 waits this long "
                    "before its next request (default 20)")
    ap.add_argument("--rss-requests", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the service and the in-process run")
    ap.add_argument("--time-limit", type=float, default=600, help="seconds for the whole run (phases stop early)")
    ap.add_argument("--out", default="defectscope-bench/serve_load.json")
    args = ap.parse_args()
    t_end = time.perf_counter() + args.time_limit
    clients = [int(c) for c in args.clients.split(",")]

    import torch

    torch.set_num_threads(args.threads)
    from defectscope import Inferencer, create_model
    from defectscope.data import load_dataset, make_synthetic
    from defectscope.data.validation import validation_split
    from defectscope.deploy import calibrate

    record: dict = {"model": args.model, "size": args.size, "threads": args.threads, "max_batch": args.max_batch,
                    "max_wait_ms": args.max_wait_ms, "queue_size": args.queue_size, "cpu": platform.processor() or
                    platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}
    with tempfile.TemporaryDirectory() as tmp:
        root = make_synthetic(Path(tmp) / "synth", categories=["fabric"], image_size=args.size, channels=3,
                              n_train=40, n_test_good=12, n_test_defect=4, seed=0, progress=False)
        train, val = validation_split(load_dataset(f"mvtec:{root}", "fabric", "train", image_size=args.size))
        model = create_model(args.model, image_size=args.size).fit(train, val)
        model.calibration = calibrate(model, val)
        model_dir = Path(tmp) / "model"
        model.save(model_dir)
        files = sorted((root / "fabric" / "test").glob("*/*.png"))
        bodies = [p.read_bytes() for p in files]

        runs = []
        svc = Service(model_dir, args.threads, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                      queue_size=args.queue_size)
        record["warmup_s"] = svc.ready_s
        try:
            drive(svc.port, bodies, 4, 40, t_end)  # warm the connections and the allocator
            # overhead: the in-process Inferencer.predict(path) (decoding included) and one request to the
            # service on the same file, interleaved call by call so that a drift of the machine hits both
            inf = Inferencer(model_dir, device="cpu")
            conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=60)
            local, local_main, remote = [], [], []
            worker = ThreadPoolExecutor(1)  # the service runs the model in a thread of its own: so does this

            def timed(path):
                t0 = time.perf_counter()
                inf.predict(path)
                return time.perf_counter() - t0

            for i in range(min(200, args.requests)):
                if time.perf_counter() > t_end:
                    break
                local.append(worker.submit(timed, files[i % len(files)]).result())
                local_main.append(timed(files[i % len(files)]))
                t0 = time.perf_counter()
                conn.request("POST", "/v1/models/fabric/predict", body=bodies[i % len(bodies)],
                             headers={"Content-Type": "image/png"})
                conn.getresponse().read()
                remote.append(time.perf_counter() - t0)
            conn.close()
            worker.shutdown()
            record["inprocess_p50_ms"] = statistics.median(local[5:]) * 1e3
            record["inprocess_main_thread_p50_ms"] = statistics.median(local_main[5:]) * 1e3
            record["service_1client_interleaved_p50_ms"] = statistics.median(remote[5:]) * 1e3
            for c in clients:
                r = drive(svc.port, bodies, c, args.requests, min(t_end, time.perf_counter() + 120))
                r["max_batch"] = args.max_batch
                runs.append(r)
                print(f"{c:>3} clients: {r['throughput_rps']:.1f} req/s, p50 {r['p50_ms']:.1f} ms, "
                      f"p99 {r['p99_ms']:.1f} ms, codes {r['codes']}", flush=True)
            rss0 = svc.rss()
            rr = drive(svc.port, bodies, 16, args.rss_requests, min(t_end, time.perf_counter() + 240))
            record["rss"] = {"before_mb": rss0, "after_mb": svc.rss(), "requests": rr["requests"],
                             "errors": rr["errors"]}
            print(f"RSS {rss0:.0f} MB -> {record['rss']['after_mb']:.0f} MB after {rr['requests']} requests",
                  flush=True)
        finally:
            svc.stop()

        svc = Service(model_dir, args.threads, max_batch=1, max_wait_ms=0, queue_size=args.queue_size)
        try:
            drive(svc.port, bodies, 4, 40, t_end)
            r = drive(svc.port, bodies, max(clients), args.requests, min(t_end, time.perf_counter() + 120))
            r["max_batch"] = 1
            runs.append(r)
        finally:
            svc.stop()
        batched = next(x for x in runs if x["clients"] == max(clients) and x["max_batch"] == args.max_batch)
        record["batching_gain"] = batched["throughput_rps"] / r["throughput_rps"] if r["throughput_rps"] else None
        print(f"micro-batching at {max(clients)} clients: {batched['throughput_rps']:.1f} vs "
              f"{r['throughput_rps']:.1f} req/s with max batch 1 (x{record['batching_gain']:.2f})", flush=True)

        svc = Service(model_dir, args.threads, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                      queue_size=args.overload_queue)
        try:
            o = drive(svc.port, bodies, args.overload_clients, args.requests, min(t_end, time.perf_counter() + 120),
                      backoff_s=args.backoff_ms / 1000)
        finally:
            svc.stop()
        o["queue_size"] = args.overload_queue
        o["share_503"] = o["codes"].get("503", 0) / max(1, o["requests"])
        o["other_errors"] = o["errors"] - o["codes"].get("503", 0)
        record["overload"] = o
        record["runs"] = runs
        record["overhead_ms"] = record["service_1client_interleaved_p50_ms"] - record["inprocess_p50_ms"]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print()
    print(f"{args.model} {args.size} px, {args.threads} torch threads, {record['cpus']} CPUs; "
          f"max wait {args.max_wait_ms:g} ms; warm-up (start to ready) {record['warmup_s']:.2f} s")
    print()
    print("| clients | max batch | requests | throughput (req/s) | p50 (ms) | p99 (ms) | errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for x in runs:
        print(f"| {x['clients']} | {x['max_batch']} | {x['requests']} | {x['throughput_rps']:.1f} | "
              f"{x['p50_ms']:.1f} | {x['p99_ms']:.1f} | {x['errors']} |")
    print()
    print(f"- micro-batching gain at {max(clients)} clients: x{record['batching_gain']:.2f} throughput "
          f"(max batch {args.max_batch} vs 1)")
    print(f"- overload: {o['clients']} clients (backing off {args.backoff_ms:g} ms after a 503), queue "
          f"{o['queue_size']}: {100 * o['share_503']:.1f} % of {o['requests']} requests answered 503, "
          f"{o['other_errors']} other errors, {o['codes'].get('200', 0) / o['seconds']:.1f} answers/s served")
    rss = record["rss"]
    print(f"- RSS: {rss['before_mb']:.0f} MB before, {rss['after_mb']:.0f} MB after {rss['requests']} requests "
          f"({rss['errors']} errors)")
    print(f"- overhead, interleaved call by call on the same files: service p50 "
          f"{record['service_1client_interleaved_p50_ms']:.2f} ms vs in-process Inferencer.predict(path) "
          f"{record['inprocess_p50_ms']:.2f} ms ({record['overhead_ms']:+.2f} ms), called from a worker thread as the "
          f"service does ({record['inprocess_main_thread_p50_ms']:.2f} ms from the main thread)")
    try:
        load = os.getloadavg()
        print(f"- load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} ({record['cpus']} CPUs)")
        record["loadavg"] = load
    except OSError:
        pass
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
