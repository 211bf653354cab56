"""Where the gateway's time goes: py-spy on the gateway process while ``bench/compare.py`` loads it.

For each concurrency level, starts ``compare.py`` for the gateway contender alone (one round, one level), attaches
``py-spy record`` to the gateway process once the load is on, and sums the collapsed stacks into the functions with
the most samples (own time and inclusive). Also samples the CPU time of every process of the run (gateway, Triton,
its python-backend stub, the load generator) over the same window, which says which process is the bottleneck.

    python bench/profile_gateway.py --levels 1,16,64            # -> bench/results/profile-<stamp>.json (+ .txt)
    python bench/profile_gateway.py --contender gateway-grpc --levels 64

py-spy is in the ``bench`` extra (``pip install py-spy``); it needs ptrace rights over the gateway (root, or
``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import gateway_bench as gb

#: Process roles by command line, for the CPU split.
ROLES = (
    ("triton_python_backend_stub", "python-backend stub (ONNX Runtime)"),
    ("tritonserver", "tritonserver"),
    ("service.gateway", "gateway"),
    ("bench/compare.py", "load generator"),
)


def _role(cmdline: str) -> str | None:
    return next((name for key, name in ROLES if key in cmdline), None)


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of every process of the run, by pid."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        role = _role(cmd)
        if role:
            out[int(entry.name)] = (role, (int(fields[11]) + int(fields[12])) / tick)
    return out


def top_frames(collapsed: Path, n: int) -> dict:
    """Own-time and inclusive shares of the ``n`` busiest functions in py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = stack.split(";")
        own[frames[-1]] += k
        for f in set(frames):
            inclusive[f] += k

    def share(c: collections.Counter[str]) -> list[dict]:
        return [{"frame": f, "share": round(v / total, 3)} for f, v in c.most_common(n)] if total else []

    return {"samples": total, "own": share(own), "inclusive": share(inclusive)}


def profile_level(args: argparse.Namespace, level: int, out: Path) -> dict:
    log = out / "profile-runs" / f"profile-run-{args.contender}-c{level}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        str(REPO_ROOT / "bench" / "compare.py"),
        "--contenders",
        args.contender,
        "--levels",
        str(level),
        "--repeats",
        "1",
        "--duration-seconds",
        str(args.seconds + 8),
        "--warmup-seconds",
        "2",
        "--ceiling-seconds",
        "0",
        "--many-texts",
        "0",
        "--out",
        str(out / "profile-runs"),
    ]
    if args.model_repository:
        cmd += ["--model-repository", str(args.model_repository)]
    with open(log, "w") as fh:
        bench = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=fh, stderr=subprocess.STDOUT)
    try:
        pid = None
        give_up = time.monotonic() + 180
        while pid is None and time.monotonic() < give_up and bench.poll() is None:  # bounded wait for the gateway
            pid = next((p for p, (role, _) in cpu_seconds().items() if role == "gateway"), None)
            time.sleep(0.5)
        if pid is None:
            raise RuntimeError(f"the gateway did not start (see {log})")
        time.sleep(8)  # start-up and the warm-up window
        raw = out / "profile-runs" / f"profile-{args.contender}-c{level}.collapsed.txt"
        raw.parent.mkdir(parents=True, exist_ok=True)
        before = cpu_seconds()
        t0 = time.monotonic()
        spy = [args.py_spy, "record", "-p", str(pid), "-d", str(args.seconds), "-r", str(args.rate)]
        subprocess.run(
            [*spy, "-f", "raw", "-o", str(raw), "--nonblocking"], check=False, capture_output=True, timeout=120
        )
        after = cpu_seconds()
        window = time.monotonic() - t0
        bench.wait(timeout=300)
    finally:
        if bench.poll() is None:
            bench.terminate()
    split: dict[str, float] = collections.defaultdict(float)
    for p, (role, t) in after.items():
        if p in before:
            split[role] += (t - before[p][1]) / window
    measured = next((line.strip() for line in log.read_text().splitlines() if "round 1" in line), "")
    return {
        "level": level,
        "measured": measured,
        "cpu_cores_by_process": {k: round(v, 2) for k, v in sorted(split.items(), key=lambda kv: -kv[1])},
        "gateway_profile": top_frames(raw, args.top),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contender", default="gateway-int8", choices=("gateway-int8", "gateway-grpc"))
    p.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    p.add_argument("--seconds", type=int, default=8, help="py-spy window per level")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=15, help="functions kept per ranking")
    p.add_argument("--model-repository", type=Path, default=None)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    p.add_argument("--py-spy", default=shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy")))
    args = p.parse_args(argv)
    if not Path(args.py_spy).exists():
        sys.exit("py-spy is not installed (pip install py-spy)")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    levels = []
    for level in args.levels:
        print(f"profiling {args.contender} at {level} clients ...", flush=True)
        levels.append(profile_level(args, level, args.out))
        r = levels[-1]
        print(f"  {r['measured']}\n  CPU cores: {r['cpu_cores_by_process']}", flush=True)
        for row in r["gateway_profile"]["own"][:8]:
            print(f"    {100 * row['share']:5.1f}%  {row['frame']}", flush=True)
    data = {"recorded_at": stamp, "machine": gb.machine(), "contender": args.contender, "levels": levels}
    path = args.out / f"profile-{stamp}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
