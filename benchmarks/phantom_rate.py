"""Virtual patients per second: the whole patient (phantom, every image, report), single process.

    python benchmarks/phantom_rate.py --n 5000            # the number quoted in docs/phantoms.md
    python benchmarks/phantom_rate.py --n 200 --size 64 128 256

Prints wall-clock and CPU rates per size, and the time per chest and per head patient (chest patients cost
more: they rasterise the whole volume for the radiograph, head patients only the axial slice).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from medm2g_diffusers.data.phantoms import PhantomGenerator


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="patients per size")
    parser.add_argument("--size", type=int, nargs="+", default=[64], help="image sizes in pixels")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def measure(n: int, size: int, seed: int) -> dict[str, float]:
    generator = PhantomGenerator(seed=seed, size=size)
    seconds = {"chest": 0.0, "head": 0.0}
    counts = {"chest": 0, "head": 0}
    wall, cpu = time.perf_counter(), time.process_time()
    for index in range(n):
        start = time.perf_counter()
        patient = generator.patient(index)
        seconds[patient.anatomy] += time.perf_counter() - start
        counts[patient.anatomy] += 1
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "wall_s": wall,
        "rate": n / wall,
        "cpu_rate": n / cpu,
        **{f"{a}_ms": 1000.0 * seconds[a] / max(counts[a], 1) for a in seconds},
    }


def main() -> None:
    args = parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}")
    for size in args.size:
        r = measure(args.n, size, args.seed)
        print(
            f"size {size}: {args.n} patients in {r['wall_s']:.1f} s = {r['rate']:.1f} patients/s "
            f"(CPU time {r['cpu_rate']:.1f} patients/s); chest {r['chest_ms']:.1f} ms, head {r['head_ms']:.1f} ms"
        )


if __name__ == "__main__":
    main()
