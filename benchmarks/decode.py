"""Reading a real-size image file, paired in one process: defectscope's ``read_image`` against
PIL's decode alone (the floor of any PIL-based reader) and against the former numpy conversion
(``asarray(img.convert("RGB"), float32) / 255``, transposed: what ``read_image`` did before its
8-bit conversion moved to torch).

    python benchmarks/decode.py [--files GLOB] [--size 900] [--threads 2] [--rounds 3]

Without ``--files`` it writes 24 synthetic washer images of ``--size`` px as RGB PNG files (as
``benchmarks/runtime.py`` does) into a temporary folder. Prints the median ms per file of each
reader, round by round (the readers alternate within a round), and checks that the two
conversions give the same tensor bit for bit.
"""

from __future__ import annotations

import argparse
import glob
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
        print(f"{len(files)} files ({Image.open(files[0]).size[0]} px, {Image.open(files[0]).mode}), "
              f"{args.threads} threads; median ms per file, the two conversions equal bit for bit")
        for r in range(args.rounds):
            times = {name: [] for name in readers}
            for f in files:
                for name, fn in readers.items():
                    t0 = time.perf_counter()
                    fn(f)
                    times[name].append(time.perf_counter() - t0)
            print(f"round {r + 1}: " + "; ".join(f"{n} {statistics.median(t) * 1000:.1f}" for n, t in times.items()))


if __name__ == "__main__":
    main()
