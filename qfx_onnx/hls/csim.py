"""C simulation of a generated project with g++ against the real ``ap_types`` headers.

The testbench (``tb/tb_<top>.cpp``) compares every output bit of every test vector with the
PyTorch emulation's codes and prints ``QFX-CSIM vectors=... values=... mismatches=...``; this
module compiles it with :func:`qfx_onnx.hls.aptypes.compile_cpp`, runs it and parses that line.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from qfx_onnx.errors import ExportError
from qfx_onnx.hls.aptypes import compile_cpp, find_ap_types_include

_SUMMARY = re.compile(r"QFX-CSIM vectors=(\d+) values=(\d+) mismatches=(\d+)")
# -O0: a third of -O1's compile time (ap_fixed's templates dominate), and a few test vectors
# still run in seconds. GCC 12's access-warning pass ("access analysis") takes minutes on the static
# initializers of large ap_fixed weight arrays even under -w; turning its warnings off skips it
# (g++ ignores -Wno-* options it does not know).
CSIM_FLAGS = ("-O0", "-w", "-Wno-stringop-overflow", "-Wno-stringop-overread", "-Wno-free-nonheap-object",
              "-Wno-mismatched-dealloc", "-Wno-mismatched-new-delete", "-Wno-use-after-free",
              "-Wno-dangling-pointer", "-Wno-array-bounds", "-Wno-nonnull", "-Wno-alloc-size-larger-than",
              "-Wno-restrict")


@dataclass
class CsimResult:
    vectors: int
    values: int
    mismatches: int
    returncode: int
    output: str
    compile_s: float
    run_s: float

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and self.mismatches == 0 and self.vectors > 0


def compile_csim(project: str | Path, top: str, *, jobs: int = 2, flags=CSIM_FLAGS) -> Path:
    """Compile ``firmware/<top>.cpp`` and the testbench into ``csim/csim_<top>``; returns the binary."""
    project = Path(project)
    sources = [project / "firmware" / f"{top}.cpp", project / "tb" / f"tb_{top}.cpp"]
    include = [find_ap_types_include(), project / "firmware"]
    return compile_cpp(sources, project / "csim" / f"csim_{top}", include, flags, jobs=jobs)


def run_csim(project: str | Path, top: str, *, jobs: int = 2, timeout: float = 600.0,
             binary: Path | None = None) -> CsimResult:
    """Compile (unless ``binary`` is given) and run the C simulation in ``<project>/tb``."""
    project = Path(project)
    t0 = time.perf_counter()
    binary = binary or compile_csim(project, top, jobs=jobs)
    t1 = time.perf_counter()
    try:
        proc = subprocess.run([str(binary), "tb_data"], cwd=project / "tb", capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ExportError(f"C simulation timed out after {timeout:g} s") from None
    t2 = time.perf_counter()
    output = proc.stdout + proc.stderr
    m = _SUMMARY.search(proc.stdout)
    vectors, values, mismatches = (int(g) for g in m.groups()) if m else (0, 0, -1)
    return CsimResult(vectors, values, mismatches, proc.returncode, output, t1 - t0, t2 - t1)
