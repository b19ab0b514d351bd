"""Load on `lesionstack serve`: latency and throughput from concurrent clients, and whether memory grows.

    python benchmarks/bench_serve.py ARTIFACTS [--image CROP.jpg] [--clients 8] [--timed 200]

Starts the real server (`lesionstack serve -a ARTIFACTS`, a subprocess on a free loopback port), then sends
POST /api/predict with a real ISIC 2024 crop from `--clients` concurrent clients, in bounded phases:

    requests 1..100       -> resident memory (RSS) of the server process after 100 requests
    requests 1..200       -> p50 / p95 latency and requests/s (the timed figure; --timed)
    requests 201..1000    -> RSS after 1,000 requests

Every answer must be 200. All figures come from this one run, on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from lesionstack.inference.serve import launch

SHARED_DATA = Path(os.environ.get("LESIONSTACK_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
REAL_CROP = SHARED_DATA / "isic2024-real-crops" / "ISIC_0015670.jpg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def phase(url: str, image: bytes, n: int, clients: int) -> tuple[list[float], float]:
    """`n` requests spread over `clients` threads, each with its own connection; (latencies, wall seconds)."""
    def one_client(count: int) -> list[float]:
        out = []
        with httpx.Client(timeout=120) as client:
            for _ in range(count):
                start = time.perf_counter()
                r = client.post(url, files={"image": ("crop.jpg", image, "image/jpeg")})
                out.append(time.perf_counter() - start)
                if r.status_code != 200:
                    raise SystemExit(f"HTTP {r.status_code}: {r.text[:300]}")
        return out

    shares = [n // clients + (i < n % clients) for i in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [t for part in pool.map(one_client, shares) for t in part]
    return latencies, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", type=Path)
    ap.add_argument("--image", type=Path, default=REAL_CROP)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--timed", type=int, default=200, help="requests in the timed figure (>= 100)")
    ap.add_argument("--total", type=int, default=1000, help="requests before the second memory reading")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    image, port = args.image.read_bytes(), free_port()
    load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    server = launch(args.artifacts, port, device=args.device)
    url = f"http://127.0.0.1:{port}/api/predict"
    try:
        health = httpx.get(f"http://127.0.0.1:{port}/healthz").json()
        first, t1 = phase(url, image, 100, args.clients)
        rss_100 = rss_mib(server.pid)
        second, t2 = phase(url, image, args.timed - 100, args.clients)
        rest, _ = phase(url, image, args.total - args.timed, args.clients)
        rss_1000 = rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    timed = np.array(first + second) * 1000
    figures = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
        "model": f"{health['model']['kind']}, {health['model']['n_models']} CNN(s), "
                 f"{health['model']['image_size']} px, {health['model']['device']}",
        "image": f"{args.image.name} ({len(image):,} bytes)", "clients": args.clients,
        "timed_requests": len(timed), "p50_ms": round(float(np.percentile(timed, 50)), 1),
        "p95_ms": round(float(np.percentile(timed, 95)), 1), "requests_per_s": round(len(timed) / (t1 + t2), 2),
        "load_average_1min_before_after": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "rss_mib_after_100": round(rss_100, 1), f"rss_mib_after_{args.total}": round(rss_1000, 1),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
