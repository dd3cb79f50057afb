"""What every benchmark run leaves behind: its Markdown (what the case printed) and a JSON record saying
which command made it, when, at which commit, on which machine and under which load."""

from __future__ import annotations

import io
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress to stderr with the seconds since the suite started (stdout is the case's Markdown)."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def md_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; cells are str()-ed."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def git_commit() -> dict:
    """The checkout's commit and whether tracked files differ from it (None where git cannot tell)."""
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict:
    """Platform, cores, memory, and torch's build and device where torch is already imported."""
    m = {"host": platform.node(), "platform": platform.platform(), "machine": platform.machine(),
         "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        m["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    torch = sys.modules.get("torch")
    if torch is not None:
        m["torch"] = torch.__version__
        m["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            m["cuda_device"] = torch.cuda.get_device_name(0)
    return m


def command(case: str, argv: list[str]) -> str:
    return shlex.join(["python", "-m", "benchmarks", case, *argv])


class Tee(io.TextIOBase):
    """Writes to the real stdout and keeps a copy (the case's Markdown)."""

    def __init__(self, stream) -> None:
        self.stream, self.copy = stream, io.StringIO()

    def write(self, s: str) -> int:
        self.stream.write(s)
        self.copy.write(s)
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def _one(load: list[float] | None) -> str:
    return "?" if not load else f"{load[0]:.1f}"


def write_outputs(out: Path, case: str, markdown: str, record: dict) -> tuple[Path, Path]:
    """out/CASE.md (a header naming the command, date, commit and machine, then the case's Markdown) and
    out/CASE.json (the record); each written whole to a temporary name, then renamed."""
    out.mkdir(parents=True, exist_ok=True)
    m, g = record["machine"], record["git"]
    head = (f"<!-- {record['command']} -->\n_{record['finished']}, commit {(g['commit'] or 'unknown')[:10]}"
            f"{' (modified)' if g['dirty'] else ''}, {m['cpus']} CPUs {m['machine']}"
            f"{', ' + m['cuda_device'] if 'cuda_device' in m else ', no GPU'}, load average (1 min) "
            f"{_one(record['load_average']['start'])} -> {_one(record['load_average']['end'])}; "
            f"{record['wall_s']:.1f} s_\n\n")
    md, js = out / f"{case}.md", out / f"{case}.json"
    for path, text in ((md, head + markdown), (js, json.dumps(_json_safe(record), indent=1, default=str) + "\n")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return md, js


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
