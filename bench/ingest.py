"""Ingest throughput: DICOM read + decode + resize through Ray Data vs a plain loop.

Both sides run the same function (`echo_ray.data.prepare.decode_files_batch`) on the same files of a
synthetic archive, in one run on one machine: the ratio isolates the execution engine.
Prints a table, then one JSON line with every figure (`ray_vs_loop`, `images_per_s`, ...).

    python bench/ingest.py [--studies 100] [--archive-image-size 1024] [--image-size 256]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import ray

from echo_ray.data.prepare import decode_files_batch
from echo_ray.data.storage import resolve
from echo_ray.synth.archive import synthesize_archive


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archive", default=None, help="existing archive (else a synthetic one)")
    p.add_argument("--studies", type=int, default=100)
    p.add_argument("--archive-image-size", type=int, default=1024)
    p.add_argument("--image-size", type=int, default=256, help="model input size (resize)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=2, help="timed passes per engine (best kept)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        archive = args.archive
        if archive is None:
            archive = os.path.join(tmp, "archive")
            synthesize_archive(
                archive, num_studies=args.studies, seed=1, image_size=args.archive_image_size
            )
        src = resolve(archive)
        paths = [f for f in src.list_files() if f.lower().endswith(".dcm")]
        kwargs = {"src": src, "image_size": args.image_size}

        def loop() -> int:
            done = 0
            for i in range(0, len(paths), args.batch_size):
                out = decode_files_batch({"path": np.array(paths[i:i + args.batch_size])}, **kwargs)
                done += int(out["ok"].sum())
            return done

        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False

        def ray_pipeline() -> int:
            ds = ray.data.from_items(
                [{"path": f} for f in paths],
                override_num_blocks=max(1, len(paths) // args.batch_size),
            ).map_batches(
                decode_files_batch, fn_kwargs=kwargs, batch_size=args.batch_size, num_cpus=1
            )
            return sum(int(b["ok"].sum()) for b in ds.iter_batches(batch_size=64))

        loop_n = ray_pipeline()  # warm-up: starts the workers, imports the decoders
        timings = {}
        for name, fn in (("loop", loop), ("ray", ray_pipeline)):
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                n = fn()
                best = min(best, time.perf_counter() - t0)
            assert n == loop_n, f"{name} decoded {n} images, expected {loop_n}"
            timings[name] = best
        ray.shutdown()

    loop_ips = loop_n / timings["loop"]
    ray_ips = loop_n / timings["ray"]
    result = {
        "images": loop_n,
        "archive_image_size": args.archive_image_size,
        "image_size": args.image_size,
        "num_cpus": args.num_cpus,
        "loop_images_per_s": round(loop_ips, 2),
        "images_per_s": round(ray_ips, 2),
        "ray_vs_loop": round(ray_ips / loop_ips, 3),
    }
    print(f"{'engine':<28}{'images':>8}{'seconds':>10}{'images/s':>10}")
    print(f"{'plain loop (1 process)':<28}{loop_n:>8}{timings['loop']:>10.2f}{loop_ips:>10.1f}")
    print(f"{f'Ray Data ({args.num_cpus} CPUs)':<28}{loop_n:>8}{timings['ray']:>10.2f}"
          f"{ray_ips:>10.1f}")
    print(f"ray_vs_loop = {result['ray_vs_loop']:.2f}x")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
