"""CPU a node agent's fetch costs per MB, by the size of the pieces it hands on.

On the emulated cluster of `bench/coldstart.py` every node agent shares the machine's cores
with the pipeline stages, so the fetch path's CPU comes out of their compute. This bench runs
the real storage service (egress cap as in `bench/coldstart.py`) and the real
`fetch_partition` into a real partition file at one node's NIC rate, with the receive pieces
at httpx's 64 KB and at `RECEIVE_PIECE_BYTES`, in turn, `--rounds` times, and prints the
client's and the store's CPU seconds and their ratio.

    .venv/bin/python bench/fetch_cpu.py [--size 100m] [--nic-mb-s 13.79] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from libs.common.embedded.process import free_port  # noqa: E402
from services.prefetcher import fetch  # noqa: E402

HTTPX_PIECE_BYTES = 64 << 10


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _one(url: str, model: str, piece_bytes: int, nic_bytes_per_s: float, store_pid: int
               ) -> tuple[float, float, float, int]:
    """(client CPU s, store CPU s, wall s, bytes) of fetching stage 1 of 4."""
    fetch.RECEIVE_PIECE_BYTES = piece_bytes
    with tempfile.TemporaryDirectory() as tmp:
        client, store, started = _cpu_self(), _cpu_of(store_pid), time.monotonic()
        result = await fetch.fetch_partition(url, model, 4, 1, Path(tmp) / "partition",
                                             bandwidth_cap_bytes_per_s=nic_bytes_per_s)
        return (_cpu_self() - client, _cpu_of(store_pid) - store, time.monotonic() - started,
                result.num_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="100m", choices=["tiny", "small", "100m"])
    parser.add_argument("--nic-mb-s", type=float, default=13.79,
                        help="one node's NIC, MB/s (bench/coldstart.py's default)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from services.worker.demo_model import write_demo_model

    model_dir = ROOT / "bench" / "out" / "models" / args.size
    if not (model_dir / "config.json").exists():
        write_demo_model(model_dir, size=args.size)
    nic = args.nic_mb_s * 1e6
    port = free_port("127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as root:
        store = subprocess.Popen(
            [sys.executable, "-m", "services.storage", "--root", root, "--port", str(port),
             "--egress-mbps", f"{nic * 8 / 1e6 * 4:.3f}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        try:
            for _ in range(300):
                try:
                    httpx.get(f"{url}/models", timeout=1.0)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            httpx.post(f"{url}/models", json={"path": str(model_dir), "name": "fetch-cpu"},
                       timeout=600).raise_for_status()
            results: dict[int, list[tuple[float, float, float, int]]] = {}
            pieces = (HTTPX_PIECE_BYTES, fetch.RECEIVE_PIECE_BYTES)
            for round_index in range(args.rounds):
                for piece in pieces:
                    one = asyncio.run(_one(url, "fetch-cpu", piece, nic, store.pid))
                    results.setdefault(piece, []).append(one)
                    print(f"round {round_index + 1}, pieces of {piece >> 10} KB: "
                          f"{one[3] / 1e6:.1f} MB in {one[2]:.2f} s, client CPU {one[0]:.2f} s, "
                          f"store CPU {one[1]:.2f} s", flush=True)
        finally:
            store.terminate()
            store.wait(10)
    small, large = (statistics.median(r[0] for r in results[p]) for p in pieces)
    num_mb = results[pieces[0]][0][3] / 1e6
    print(f"\nclient CPU per MB: {small / num_mb * 1e3:.1f} ms with 64 KB pieces, "
          f"{large / num_mb * 1e3:.1f} ms with {pieces[1] >> 10} KB pieces "
          f"({large / small:.2f}x)")


if __name__ == "__main__":
    main()
