"""Load on the HTTP endpoint: dynamic batching vs none, then autoscaling up and back down.

Starts its own local Ray and Serve on loopback and runs, in one process on one machine:

1. `--clients` concurrent HTTP clients for `--seconds` against ONE model replica with
   `max_batch_size` 1 (no batching), then the same load with `max_batch_size` 16: requests
   per second, p50/p95/p99 latency, errors, mean batch size; the ratio is
   `batching_speedup` (requests/s batched / unbatched).
2. Autoscaling: the same clients against min 1 / max `--max-replicas` replicas with batching,
   replica counts sampled every second under load and after it stops, until back to 1.

Every client sends real DICOM studies (synthetic phantom radiographs, PA view) as
`application/dicom`, with an API key. The model is `--checkpoint` (e.g.
quickstart/runs/dcd/model), or without it the tiny preset randomly initialised (reports are
then gibberish, but their length is capped at `--max-new-tokens`, so the work per report is
the same). Prints a table, then one JSON line with every figure.

    python bench/serve_load.py [--checkpoint DIR] [--clients 16] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time

import numpy as np
import requests

API_KEY = "bench-key"


def _checkpoint(args: argparse.Namespace, tmp: str) -> str:
    if args.checkpoint:
        return args.checkpoint
    from _random_model import random_model

    from echo_ray.config.schema import EchoConfig
    from echo_ray.model.checkpoint import save_checkpoint

    model = random_model(EchoConfig.from_name("tiny"), 300)
    return str(save_checkpoint(model, os.path.join(tmp, "model")))


def _studies(count: int) -> list[bytes]:
    from echo_ray.synth.dicom_writer import write_dicom
    from echo_ray.synth.render import render_view
    from echo_ray.synth.sampling import sample_study

    out = []
    for i in range(count):
        image = render_view(sample_study(1, i), "PA", image_size=256)
        pixels = (np.clip(image, 0, 1) * 4095).astype(np.uint16)
        out.append(write_dicom(pixels, attrs={"Modality": "DX", "ViewPosition": "PA"}))
    return out


def _deploy(checkpoint: str, *, batch: int, replicas: tuple[int, int], args) -> None:
    from ray import serve

    from echo_ray.serving.app import build_app

    app = build_app({
        "checkpoint": checkpoint, "max_batch_size": batch, "batch_wait_timeout_s": args.wait_s,
        "min_replicas": replicas[0], "max_replicas": replicas[1], "num_cpus": 1.0,
        "decoder_num_cpus": 0.5, "decoder_max_replicas": 2,
        "threads": args.threads, "max_ongoing_requests": max(32, 2 * batch),
        "target_ongoing_requests": args.target, "max_new_tokens": args.max_new_tokens,
    })
    serve.run(app, name="echo-ray", route_prefix="/")


def _replicas() -> str:
    """"running+starting" model replicas, e.g. "1+1" (a second one is loading)."""
    from ray import serve

    states = serve.status().applications["echo-ray"].deployments["ReportModel"].replica_states
    return f"{states.get('RUNNING', 0)}+{states.get('STARTING', 0)}"


def _load(url: str, studies: list[bytes], clients: int, seconds: float,
          on_tick=None) -> dict:
    """`clients` threads posting studies back to back for `seconds`."""
    latencies, batch_sizes, errors = [], [], []
    lock, stop = threading.Lock(), threading.Event()

    def client(k: int) -> None:
        session = requests.Session()
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/dicom"}
        i = k
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = session.post(url, data=studies[i % len(studies)], headers=headers, timeout=120)
                ok = r.status_code == 200
                body = r.json() if ok else None
            except requests.RequestException:
                ok, body = False, None
            dt = 1000 * (time.perf_counter() - t0)
            with lock:
                if ok:
                    latencies.append(dt)
                    batch_sizes.append(body["batch_size"])
                else:
                    errors.append(dt)
            i += clients

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    while time.perf_counter() - start < seconds:
        time.sleep(1.0)
        if on_tick:
            on_tick(time.perf_counter() - start)
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    q = np.percentile(latencies, [50, 95, 99]) if latencies else [float("nan")] * 3
    return {
        "requests": len(latencies), "errors": len(errors), "wall_s": round(wall, 2),
        "rps": round(len(latencies) / wall, 2),
        "p50_ms": round(float(q[0]), 1), "p95_ms": round(float(q[1]), 1),
        "p99_ms": round(float(q[2]), 1),
        "mean_batch": round(statistics.fmean(batch_sizes), 2) if batch_sizes else 0.0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20.0, help="per load phase")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--wait-s", type=float, default=0.05, help="batch_wait_timeout_s")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--max-replicas", type=int, default=2)
    p.add_argument("--scale-seconds", type=float, default=45.0,
                   help="load of the autoscaling phase (the metric is averaged over 15 s)")
    p.add_argument("--target", type=float, default=4.0,
                   help="target ongoing requests per replica (autoscaling)")
    p.add_argument("--port", type=int, default=8123)
    args = p.parse_args()

    import ray
    from ray import serve

    os.environ["ECHO_RAY_API_KEYS"] = API_KEY
    tmp = tempfile.mkdtemp(prefix="echo-serve-bench-")
    checkpoint = _checkpoint(args, tmp)
    studies = _studies(32)
    ray.init(address="local", num_cpus=max(4, args.max_replicas + 1), include_dashboard=False,
             log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    url = f"http://127.0.0.1:{args.port}/v1/reports"
    rows = {}
    try:
        for name, batch in (("no batching (max batch 1)", 1),
                            (f"dynamic batching (max batch {args.max_batch_size})",
                             args.max_batch_size)):
            _deploy(checkpoint, batch=batch, replicas=(1, 1), args=args)
            _load(url, studies, args.clients, 3.0)  # warm-up, not counted
            rows[name] = _load(url, studies, args.clients, args.seconds)
            print(f"{name}: {rows[name]}", flush=True)

        _deploy(checkpoint, batch=args.max_batch_size, replicas=(1, args.max_replicas),
                args=args)
        timeline = [(0.0, _replicas())]
        t0 = time.perf_counter()
        rows["autoscaling (batched)"] = _load(
            url, studies, args.clients, args.scale_seconds,
            on_tick=lambda t: timeline.append((round(t, 1), _replicas())))
        load_end = time.perf_counter() - t0
        while time.perf_counter() - t0 < load_end + 90:
            time.sleep(2.0)
            timeline.append((round(time.perf_counter() - t0, 1), _replicas()))
            running = [int(n.split("+")[0]) for _, n in timeline]
            if max(running) > 1 and running[-1] == 1 and timeline[-1][1] == "1+0":
                break
    finally:
        serve.shutdown()
        ray.shutdown()

    unbatched, batched = list(rows.values())[:2]
    print()
    print(f"{args.clients} clients on loopback, {args.seconds:g} s per phase, one replica "
          f"(1 CPU, {args.threads} torch thread), reports capped at {args.max_new_tokens} "
          f"tokens, checkpoint {args.checkpoint or 'tiny preset (random init)'}")
    print("| phase | requests/s | p50 ms | p95 ms | p99 ms | errors | mean batch |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
              f"{r['p99_ms']:.0f} | {r['errors']} | {r['mean_batch']:.1f} |")
    speedup = batched["rps"] / unbatched["rps"] if unbatched["rps"] else float("nan")
    print(f"\ndynamic batching vs none: {speedup:.2f}x requests/s")
    changes = [(t, n) for i, (t, n) in enumerate(timeline) if i == 0 or n != timeline[i - 1][1]]
    running = [int(n.split("+")[0]) for _, n in timeline]
    print(f"model replicas running+starting (load from 0 s to {load_end:.0f} s, then idle; "
          "sampled every 1-2 s): " + ", ".join(f"{n} at {t:g} s" for t, n in changes)
          + ("" if changes[-1] == timeline[-1] else
             f", {timeline[-1][1]} at {timeline[-1][0]:g} s (end)"))
    figures = {
        "batching_speedup": round(speedup, 3),
        "p99_ms": batched["p99_ms"],
        "errors": sum(r["errors"] for r in rows.values()),
        "rps_batched": batched["rps"], "rps_unbatched": unbatched["rps"],
        "p50_ms_batched": batched["p50_ms"], "p95_ms_batched": batched["p95_ms"],
        "p50_ms_unbatched": unbatched["p50_ms"], "p99_ms_unbatched": unbatched["p99_ms"],
        "mean_batch_batched": batched["mean_batch"],
        "replicas_max": max(running), "replicas_after": running[-1],
        "replica_changes": changes, "load_end_s": round(load_end, 1),
        "clients": args.clients, "seconds": args.seconds,
        "checkpoint": args.checkpoint,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
