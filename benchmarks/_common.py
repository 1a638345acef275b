"""Helpers shared by the benchmark scripts: the machine, timing, a text table, JSON.

Imported by scripts in this folder as ``from _common import ...`` (Python puts a
script's own folder first on ``sys.path``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

import torch


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Instruction-set extensions that decide which int8/float kernels can run (as /proc/cpuinfo names them)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "amx_int8")
# Set before start, these pin the ISA of the libraries under the fp32 baseline and the peers
ISA_ENV = ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def cpu_flags() -> list[str]:
    """Which of :data:`ISA_FLAGS` the CPU has (from /proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in ISA_FLAGS if flag in have]
    except OSError:
        pass
    return []


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (other work on the machine skews CPU timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _aten_capability() -> str | None:
    """The vector ISA of ATen's CPU kernels (``ATEN_CPU_CAPABILITY`` caps it)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return None


def machine_info(device: torch.device) -> dict:
    """Everything needed to name the machine a result came from: the CPU, its ISA extensions
    (``cpu_flags``) and the environment variables that pin the libraries' ISA (``isa_env``)."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "load_average": load_average(),
        "cpu_flags": cpu_flags(),
        "aten_cpu_capability": _aten_capability(),
        "isa_env": {var: os.environ.get(var) for var in ISA_ENV},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return info


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_call(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    """Wall seconds of ``fn()``, with the device synchronized before and after."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def cold_compile_cache() -> str:
    """Point Inductor's and Triton's on-disk caches at a fresh folder, so compile times are cold.

    Must run before the first ``torch.compile`` call of the process.
    """
    path = tempfile.mkdtemp(prefix="ditq-bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    os.environ["TRITON_CACHE_DIR"] = os.path.join(path, "triton")
    return path


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (readable as plain text too); floats are formatted by the caller."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def finish(results: dict, start: float, render: Callable[[dict], str], json_path: str | None) -> dict:
    """The end of every benchmark: load average and wall time into ``results``, the table printed,
    the JSON written when asked."""
    results["load_average_after"] = load_average()
    results["wall_s"] = time.perf_counter() - start
    print(render(results))
    print(f"\ntotal wall time {results['wall_s']:.0f} s")
    if json_path:
        write_json(json_path, results)
        print(f"wrote {json_path}")
    return results


PEER_ISA_NOTE = (
    "peers and the fp32 baseline still use the machine's best ISA unless pinned "
    "(MKL_ENABLE_INSTRUCTIONS=AVX2, ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2 set before start)"
)


def cap_isa(name: str | None, notes: list[str]) -> None:
    """Cap ditq's CPU kernels at instruction set ``name`` (None: the machine's best); below the best,
    note in ``notes`` that the other rows are not capped by it."""
    from ditq.kernels import cpu

    best = cpu.isa()
    if name:
        cpu.set_isa(name)
    if cpu.isa() < best:
        notes.append(
            f"ditq's CPU kernels capped at {cpu.ISAS[cpu.isa()]} (best here {cpu.ISAS[best]}); "
            + PEER_ISA_NOTE
        )


def row_machine(machine: dict, device: torch.device) -> dict:
    """What every result row carries: the CPU model and ditq's kernel ISA in force (CPU only)."""
    isa = None
    if device.type == "cpu":
        from ditq.kernels import cpu

        isa = cpu.ISAS[cpu.isa()]
    return {"cpu": machine["cpu"], "isa": isa}
