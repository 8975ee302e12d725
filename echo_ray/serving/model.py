"""`ReportModel`, the model replicas of the Serve app.

A `ReportGenerator` behind `@serve.batch`, so concurrent studies share one forward per block;
torch and the model load in the replica's constructor, never at import. A replica serves the
decoding modes `options.served_modes` gives (the checkpoint's unless the app names them);
`info()` tells the ingress which.
"""

import asyncio
import base64
import io
import logging

from ray import serve

from echo_ray.config.schema import DECODING_MODES
from echo_ray.data.storage import model_name
from echo_ray.serving.options import AppArgs, served_modes

logger = logging.getLogger("echo_ray.serve")

MODEL_DEPLOYMENT = "ReportModel"


@serve.deployment(name=MODEL_DEPLOYMENT)
class ReportModel:
    """A `ReportGenerator` replica; concurrent studies are decoded as one batch."""

    def __init__(self, options: dict) -> None:
        from echo_ray.data.storage import resolve_model_dir
        from echo_ray.decode.replica import ModelReplica

        args = AppArgs.parse(options)
        opts, config = args.serve, args.config
        replica = ModelReplica(threads=opts.threads, cpus=opts.num_cpus,
                               use_gpu=opts.num_gpus > 0, name="serve")
        loc = resolve_model_dir(args.checkpoint, s3_endpoint=args.s3_endpoint, what="checkpoint")
        self.generator = replica.generator(  # warmed up: not in the first request's latency
            loc, config.decoding, include_phi=opts.include_phi,
            model_id=opts.model_id or model_name(args.checkpoint),
            modalities=tuple(config.data.modalities) or None,
        )
        self.options = opts
        self.trained_modes = list(getattr(self.generator, "trained_modes", DECODING_MODES))
        self.modes, self.default_decoding = served_modes(config, self.trained_modes)
        if config.decoding.mode != self.default_decoding:
            logger.warning("decoding %s is not served (modes %s): the default is %s",
                           config.decoding.mode, self.modes, self.default_decoding)
        self.replica = serve.get_replica_context().replica_tag
        self._set_batching(opts.max_batch_size, opts.batch_wait_timeout_s)

    def reconfigure(self, config: dict) -> None:
        """`user_config`: {max_batch_size, batch_wait_timeout_s}."""
        self._set_batching(
            int(config.get("max_batch_size", self.options.max_batch_size)),
            float(config.get("batch_wait_timeout_s", self.options.batch_wait_timeout_s)),
        )

    def _set_batching(self, size: int, wait: float) -> None:
        self.max_batch_size, self.batch_wait_timeout_s = size, wait
        self._report_batch.set_max_batch_size(size)
        self._report_batch.set_batch_wait_timeout_s(wait)

    def info(self) -> dict:
        config = self.generator.model.config
        return {
            "id": self.generator.model_id,
            "version": self.generator.model_version,
            "default_decoding": self.default_decoding,
            "modes": list(self.modes),
            "trained_modes": self.trained_modes,
            "block_length": self.generator.model.block_length,
            "image_size": config.image_size,
            "max_new_tokens": self.generator.max_new_tokens or config.max_response_len,
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
            "replica": self.replica,
        }

    async def report(self, files: list[tuple[str, bytes]], decoding: str, preview: bool):
        return await self._report_batch((files, decoding, preview))

    async def stream(self, files: list[tuple[str, bytes]], decoding: str, preview: bool = False):
        """One study alone (no batching), streamed: {"event": "block", "text"} per final
        block, then {"event": "report", ...the report or error dict}."""
        from echo_ray.decode.studies import report_studies

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_text(texts: list[str]) -> None:  # called in the decoding thread
            loop.call_soon_threadsafe(queue.put_nowait, ("block", texts[0]))

        async def decode() -> None:
            try:
                out = await asyncio.to_thread(
                    report_studies, self.generator, [files], decoding=decoding,
                    on_text=on_text, with_image=preview, with_view=preview,
                )
                queue.put_nowait(("report", out[0]))
            except Exception as exc:  # surfaces in the stream's consumer
                queue.put_nowait(("failed", exc))

        task = asyncio.create_task(decode())
        blocks = 0
        while True:
            kind, value = await queue.get()
            if kind == "block":
                blocks += 1
                yield {"event": "block", "block": blocks, "text": value}
                continue
            await task
            if kind == "failed":
                raise value
            yield {"event": "report", **_with_pngs(value, preview), "batch_size": 1,
                   "replica": self.replica}
            return

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def _report_batch(self, requests: list[tuple]) -> list[dict]:
        from echo_ray.decode.studies import report_studies

        results: list[dict | None] = [None] * len(requests)
        by_mode: dict[str, list[int]] = {}
        for i, (_, decoding, _) in enumerate(requests):
            by_mode.setdefault(decoding, []).append(i)
        for decoding, idx in by_mode.items():
            studies = [requests[i][0] for i in idx]
            preview = any(requests[i][2] for i in idx)  # images only when one is shown
            out = await asyncio.to_thread(
                report_studies, self.generator, studies, decoding=decoding,
                with_image=preview, with_view=preview,
            )
            for i, result in zip(idx, out, strict=True):
                result = _with_pngs(result, requests[i][2])
                result["batch_size"] = len(idx)
                result["replica"] = self.replica
                results[i] = result
        return results


def _with_pngs(result: dict, preview: bool) -> dict:
    """`result` without its image arrays; with `preview`, the model's input as `image_png`
    and the reader's view of the file as `view_png`, and `used_file` (the reported file's
    name, "fileK") in every report."""
    image, view = result.pop("image", None), result.pop("view", None)
    if result.get("error"):
        return result
    result["used_file"] = result.get("source_file")
    if preview and image is not None:
        result["image_png"] = _png_base64(image)
    if preview and view is not None:
        result["view_png"] = _png_base64(view)
    return result


def _png_base64(image) -> str:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()
