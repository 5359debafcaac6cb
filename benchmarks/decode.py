"""Reading a real-size image file, paired in one process: defectscope's ``read_image`` against
PIL's decode alone (the floor of any PIL-based reader) and against the former numpy conversion
(``asarray(img.convert("RGB"), float32) / 255``, transposed: what ``read_image`` did before its
8-bit conversion moved to torch). Other PNG decoders, where installed (pyspng = libspng, imagecodecs
= libpng, OpenCV), are timed from the file's bytes to a uint8 array beside PIL's same step, and each
is asked to decode a copy of a file with one flipped byte in the zlib checksum (adler32) that ends its
image data (PIL refuses it: a reader that accepts it decodes damaged files silently).

    python benchmarks/decode.py [--files GLOB] [--size 900] [--threads 2] [--rounds 3]

Without ``--files`` it writes 24 synthetic washer images of ``--size`` px as RGB PNG files (as
``benchmarks/runtime.py`` does) into a temporary folder. Prints the median ms per file of each
reader, round by round (the readers alternate within a round), and checks that the two
conversions give the same tensor bit for bit.
"""

from __future__ import annotations

import argparse
import glob
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _harness as H  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", help="glob of image files (default: synthetic PNG files)")
    p.add_argument("--size", type=int, default=900)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    torch.set_num_threads(args.threads)
    imageio = H.import_defectscope("defectscope.imageio")

    def numpy_reader(path):
        img = imageio._open(path)
        try:
            arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
            return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        finally:
            img.close()

    def pil_decode(path):
        with Image.open(path) as img:
            img.load()

    readers = {"PIL decode only": pil_decode, "read_image, numpy conversion (before)": numpy_reader,
               "read_image": lambda f: imageio.read_image(f, 3)}
    # bytes -> uint8 [H, W, 3] array: PIL and the other decoders that are installed
    arrays = {"PIL bytes->array": lambda d: np.asarray(Image.open(io.BytesIO(d)).convert("RGB"))}
    try:
        import pyspng

        arrays["pyspng bytes->array"] = pyspng.load
    except ImportError:
        pass
    try:
        import imagecodecs

        arrays["imagecodecs bytes->array"] = imagecodecs.png_decode
    except ImportError:
        pass
    try:
        import cv2

        arrays["OpenCV bytes->array"] = lambda d: cv2.cvtColor(
            cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        if args.files:
            files = sorted(glob.glob(args.files))
        else:
            syn = H.import_defectscope("defectscope.data.synthetic")
            syn.make_synthetic(Path(tmp), categories=["washer"], image_size=args.size, channels=3, n_train=24,
                               n_test_good=0, n_test_defect=0, seed=0)
            files = sorted(str(f) for f in (Path(tmp) / "washer" / "train" / "good").glob("*.png"))
        if not files:
            sys.exit(f"no files match {args.files!r}")
        for f in files:
            assert torch.equal(numpy_reader(f), imageio.read_image(f, 3)), f
        data = {f: Path(f).read_bytes() for f in files}
        good = data[files[0]]
        # ... adler32 (4 bytes), the IDAT chunk's CRC (4), the IEND chunk (12): flip adler32's last byte
        assert good[-8:-4] == b"IEND", "the file does not end with its IEND chunk"
        flipped = good[:-17] + bytes([good[-17] ^ 0xFF]) + good[-16:]
        for name, fn in arrays.items():
            assert np.array_equal(fn(good), arrays["PIL bytes->array"](good)), name
            try:
                verdict = "ACCEPTS it (no error)" if fn(flipped) is not None else "refuses it (None)"
            except Exception as exc:
                verdict = f"refuses it ({type(exc).__name__})"
            print(f"{name.split()[0]}: a file with a flipped byte in its zlib checksum: {verdict}")
        with Image.open(files[0]) as first:
            print(f"{len(files)} files ({first.size[0]} px, {first.mode}), {args.threads} threads; "
                  "median ms per file, the two conversions equal bit for bit")
        for r in range(args.rounds):
            times = {name: [] for name in (*readers, *arrays)}
            for f in files:
                for name, fn in readers.items():
                    t0 = time.perf_counter()
                    fn(f)
                    times[name].append(time.perf_counter() - t0)
                for name, fn in arrays.items():
                    t0 = time.perf_counter()
                    fn(data[f])
                    times[name].append(time.perf_counter() - t0)
            print(f"round {r + 1}: " + "; ".join(f"{n} {statistics.median(t) * 1000:.1f}" for n, t in times.items()))


if __name__ == "__main__":
    main()
