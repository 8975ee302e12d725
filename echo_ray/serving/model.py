"""`ReportModel`, the model replicas of the Serve app.

A `ReportGenerator` behind `@serve.batch`, so concurrent studies share one forward per block;
torch and the model load in the replica's constructor, never at import.
"""

import asyncio
import base64
import io
import tempfile

from ray import serve

from echo_ray.data.storage import model_name
from echo_ray.serving.options import ServeOptions

MODEL_DEPLOYMENT = "ReportModel"


@serve.deployment(name=MODEL_DEPLOYMENT)
class ReportModel:
    """A `ReportGenerator` replica; concurrent studies are decoded as one batch."""

    def __init__(self, options: dict) -> None:
        from echo_ray.data.prepare import setup_model_actor
        from echo_ray.data.storage import local_model_dir, resolve_model_dir
        from echo_ray.decode.predictor import ReportGenerator

        opts = ServeOptions.from_args(options)
        device = setup_model_actor(opts.threads, use_gpu=opts.num_gpus > 0)
        loc = resolve_model_dir(opts.checkpoint, s3_endpoint=opts.s3_endpoint, what="checkpoint")
        # an s3:// model is downloaded into this replica's own folder (replicas of one node
        # must not write the same files); a local one is used in place
        self.path = local_model_dir(loc, tempfile.mkdtemp(prefix="echo-serve-model-"))
        kwargs = {"modalities": opts.modalities} if opts.modalities is not None else {}
        self.generator = ReportGenerator.from_checkpoint(
            self.path,
            decoding=opts.decoding,
            threshold=opts.threshold,
            max_new_tokens=opts.max_new_tokens,
            include_phi=opts.include_phi,
            model_id=opts.model_id or model_name(opts.checkpoint),
            **kwargs,
        ).to(device)
        self.options = opts
        self.replica = serve.get_replica_context().replica_tag
        self._set_batching(opts.max_batch_size, opts.batch_wait_timeout_s)
        self.generator.warm_up()  # not in the first request's latency

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
            "default_decoding": self.options.decoding,
            "modes": list(self.options.modes),
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
                    on_text=on_text, with_image=True,
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
            image = value.pop("image", None)
            if image is not None and preview:
                value["image_png"] = _png_base64(image)
            yield {"event": "report", **value, "batch_size": 1, "replica": self.replica}
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
            out = await asyncio.to_thread(
                report_studies, self.generator, studies, decoding=decoding, with_image=True
            )
            for i, result in zip(idx, out, strict=True):
                image = result.pop("image", None)
                if image is not None and requests[i][2]:
                    result["image_png"] = _png_base64(image)
                result["batch_size"] = len(idx)
                result["replica"] = self.replica
                results[i] = result
        return results


def _png_base64(image) -> str:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()
