"""Per-image overhead of VLM-AD's client against a server that answers at once.

    PYTHONPATH=src python benchmarks/vlm_overhead.py                  # 512 px (the default), 40 images
    PYTHONPATH=src python benchmarks/vlm_overhead.py --size 256 --n 100

A fake model server on 127.0.0.1 (``http.server``, one thread per connection) answers every chat
request at once with a canned answer (``YES: ...``, with log-probabilities). What is timed is what
defectscope adds around a real model's answer time, per image:

* ``encode``: the image tensor to PNG to base64 (:func:`~defectscope.models.foundation.vlm_ad.encode_png`);
* ``predict``: ``model.predict`` on a batch of ``--n`` images, divided by ``--n``: encode + JSON
  body + HTTP request on a fresh connection + the server's parse and reply + parsing the answer
  and its log-probabilities; for Ollama's protocol and the OpenAI-compatible one, zero-shot and
  few-shot (4 reference images, encoded once per model and sent with every question).

The fake server's own work (reading the body, decoding JSON, writing the reply) is inside
``predict``, so the figure is an upper bound of the client's own overhead. Median of ``--repeats``
runs. Writes a JSON record (``--out``, default ``defectscope-bench/vlm_overhead.json``) and prints
a table. A real VLM takes 0.3-5 s per image (the reference documents: 2-5 s), so the client's
share is the ratio of these figures to that.
"""

from __future__ import annotations

import argparse
import base64
import json
import platform
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch


def fake_server() -> tuple[ThreadingHTTPServer, str]:
    ollama = json.dumps({"model": "llava", "message": {"role": "assistant", "content": "YES: a scratch."}, "done": True,
                         "logprobs": [{"token": "YES", "logprob": -0.1, "top_logprobs": [
                             {"token": "YES", "logprob": -0.1}, {"token": "NO", "logprob": -2.4}]}]}).encode()
    openai = json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": "YES: a scratch."},
                                      "logprobs": {"content": [{"token": "YES", "logprob": -0.1, "top_logprobs": [
                                          {"token": "YES", "logprob": -0.1}, {"token": "NO", "logprob": -2.4}]}]}}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))  # as a server would
            data = ollama if self.path.endswith("/api/chat") else openai
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="image side sent (default 512, VLM-AD's default)")
    ap.add_argument("--n", type=int, default=40, help="images per predict call (default 40)")
    ap.add_argument("--repeats", type=int, default=5, help="timed predict calls per variant (default 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", default="defectscope-bench/vlm_overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from defectscope.models import FitContext, create_model
    from defectscope.models.foundation.vlm_ad import encode_png

    g = torch.Generator().manual_seed(0)
    # smooth random images (a noise field would make PNG encoding unrealistically slow and large)
    low = torch.rand(args.n + 4, 3, args.size // 16, args.size // 16, generator=g)
    images = torch.nn.functional.interpolate(low, size=(args.size, args.size), mode="bilinear", align_corners=False)
    test, refs = images[: args.n], images[args.n:]

    httpd, url = fake_server()
    rows = []
    try:
        t = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            sizes = [len(base64.b64encode(encode_png(img))) for img in test]
            t.append((time.perf_counter() - t0) / args.n)
        rows.append({"variant": "encode (PNG + base64)", "ms_per_image": 1e3 * statistics.median(t),
                     "png_kb": statistics.mean(sizes) / 1e3})

        class Refs(torch.utils.data.Dataset):
            def __len__(self):
                return len(refs)

            def __getitem__(self, i):
                return {"image": refs[i]}

        for api, suffix in (("ollama", ""), ("openai", "/v1")):
            for k in (0, 4):
                model = create_model("vlm_ad", image_size=args.size, url=url + suffix, api=api, retries=0)
                if k:
                    model.fit(Refs(), context=FitContext("few-shot", ("synthetic",)))
                else:
                    model.fit(None, context=FitContext("zero-shot", ("synthetic",)))
                model.predict(test[:2])  # warm-up (reference images encoded once)
                t = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    pred = model.predict(test)
                    t.append((time.perf_counter() - t0) / args.n)
                assert torch.isfinite(pred.score).all() and pred.explanation[0] == "YES: a scratch."
                rows.append({"variant": f"predict {api}, {'zero-shot' if not k else f'{k} references'}",
                             "ms_per_image": 1e3 * statistics.median(t)})
    finally:
        httpd.shutdown()
        httpd.server_close()

    record = {"size": args.size, "n": args.n, "repeats": args.repeats, "threads": args.threads,
              "python": platform.python_version(), "torch": torch.__version__, "machine": platform.processor() or
              platform.machine(), "rows": rows,
              "command": f"PYTHONPATH=src python benchmarks/vlm_overhead.py --size {args.size} --n {args.n} "
                         f"--repeats {args.repeats} --threads {args.threads}"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"VLM-AD client overhead per image, {args.size} px, {args.n} images per call, median of {args.repeats}")
    for r in rows:
        extra = f"  (base64 PNG {r['png_kb']:.0f} kB)" if "png_kb" in r else ""
        print(f"  {r['variant']:<40} {r['ms_per_image']:8.2f} ms{extra}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
