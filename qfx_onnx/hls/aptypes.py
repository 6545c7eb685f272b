"""Locate the Xilinx ``ap_types`` headers and compile C++ against them.

Two users: the HLS exporter (C simulation of a generated project) and the tests that hold the
integer-domain reference to the real ``ap_fixed.h``. Both need the same two things: the include
folder that holds ``ap_fixed.h``, and a g++ call whose failure becomes a readable ``ExportError``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qfx_onnx.errors import ExportError

log = logging.getLogger(__name__)

_NOT_FOUND = "ap_types headers not found: install qfx-onnx[csim] (hls4ml) or set XILINX_HLS"
_BASE_FLAGS = ("-O2", "-std=c++14")
_ERROR_LINES = 12  # how much of a failed compiler's output goes into the error message


def find_ap_types_include() -> Path:
    """The folder that holds ``ap_fixed.h``, the one to pass to the compiler as ``-I``.

    Tries, in order: ``$XILINX_HLS/include`` (a Vitis HLS install), then the ``ap_types`` copy
    inside the installed ``hls4ml`` package (``templates/vivado/ap_types``). hls4ml is located
    with ``importlib.util.find_spec`` and never imported: importing it is slow and pulls in its
    whole stack. Raises ``ExportError`` when neither has the headers.
    """
    xilinx_hls = os.environ.get("XILINX_HLS")
    if xilinx_hls:
        include = Path(xilinx_hls) / "include"
        if (include / "ap_fixed.h").is_file():
            return include
        log.debug("XILINX_HLS=%s has no include/ap_fixed.h; trying hls4ml", xilinx_hls)
    try:
        spec = importlib.util.find_spec("hls4ml")
    except (ImportError, ValueError):  # a broken install, or a stub module without a spec
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        include = Path(location) / "templates" / "vivado" / "ap_types"
        if (include / "ap_fixed.h").is_file():
            return include
    raise ExportError(_NOT_FOUND)


def compiler_command() -> list[str]:
    """The C++ compiler as an argument list: ``$CXX`` (may hold flags: ``ccache g++``) or g++."""
    cxx = shlex.split(os.environ.get("CXX", "").strip() or "g++")
    if shutil.which(cxx[0]) is None:
        raise ExportError(f"C++ compiler {cxx[0]!r} not found: install g++ or set CXX")
    return cxx


def compile_cpp(
    sources: Iterable[str | os.PathLike[str]],
    out_binary: str | os.PathLike[str],
    include_dirs: Iterable[str | os.PathLike[str]] = (),
    extra_flags: Sequence[str] = (),
    *,
    jobs: int = 1,
    timeout: float | None = None,
) -> Path:
    """Compile and link ``sources`` into the executable ``out_binary``; returns its path.

    Flags are ``-O2 -std=c++14``, one ``-I`` per include folder, then ``extra_flags`` (which come
    last, so ``-O1`` or ``-std=c++17`` there override the defaults). With ``jobs > 1`` and several
    sources, the translation units are compiled to objects in parallel, then linked. The binary is
    written under a temporary name and renamed, so ``out_binary`` is never a half-written file.
    Raises ``ExportError`` carrying the compiler's first error lines when compilation fails.
    """
    sources = [Path(s) for s in sources]
    if not sources:
        raise ValueError("compile_cpp needs at least one source file")
    out_binary = Path(out_binary)
    cxx = compiler_command()
    flags = [*_BASE_FLAGS, *(f"-I{d}" for d in include_dirs), *extra_flags]
    out_binary.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=out_binary.name + ".", dir=out_binary.parent) as tmp:
        tmp_binary = Path(tmp) / out_binary.name
        if jobs > 1 and len(sources) > 1:
            objects = [Path(tmp) / f"{i}_{s.stem}.o" for i, s in enumerate(sources)]
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                runs = pool.map(lambda so: _run(cxx + flags + ["-c", str(so[0]), "-o", str(so[1])],
                                                str(so[0]), timeout), zip(sources, objects))
                for _ in runs:  # re-raises the first failure, in source order
                    pass
            link = cxx + [*extra_flags, *map(str, objects), "-o", str(tmp_binary)]
            _run(link, "linking", timeout)
        else:
            _run(cxx + flags + [*map(str, sources), "-o", str(tmp_binary)],
                 ", ".join(s.name for s in sources), timeout)
        os.replace(tmp_binary, out_binary)
    return out_binary


def _run(cmd: list[str], what: str, timeout: float | None) -> None:
    log.debug("running %s", shlex.join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ExportError(f"C++ compilation of {what} timed out after {timeout:g} s") from None
    if proc.returncode != 0:
        raise ExportError(f"C++ compilation of {what} failed ({shlex.join(cmd[:1])} exit "
                          f"{proc.returncode}):\n{_first_errors(proc.stderr or proc.stdout)}")


def _first_errors(output: str) -> str:
    """The compiler's first error lines (and the lines that follow them), not its whole novel."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if "error" in line.lower()), 0)
    return "\n".join(lines[start:start + _ERROR_LINES]) or "(no compiler output)"
