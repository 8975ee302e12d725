"""`ReportModel`, the model replicas of the Serve app.

A `ReportGenerator` behind `@serve.batch`, so concurrent studies share one forward per block;
torch and the model load in the replica's constructor, never at import. A replica takes
prepared studies only (`decode.studies.PreparedStudy`, image at the model's grid, no DICOM
bytes: `StudyDecoder` reads the files) and runs `report_prepared` on them. It serves the
decoding modes `options.served_modes` gives (the checkpoint's unless the app names them);
`info()` tells the ingress which, and the image size the decoder prepares for.
"""

import asyncio
import logging

from ray import serve

from echo_ray.config.schema import DECODING_MODES
from echo_ray.data.storage import model_name
from echo_ray.decode.studies import PreparedStudy
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
            modalities=args.modalities,
        )
        self.options = opts
        self.trained_modes = list(getattr(self.generator, "trained_modes", DECODING_MODES))
        self.modes, self.default_decoding = served_modes(config, self.trained_modes)
        if config.decoding.mode != self.default_decoding:
            logger.warning("decoding %s is not served (modes %s): the default is %s",
                           config.decoding.mode, self.modes, self.default_decoding)
        self.replica = serve.get_replica_context().replica_tag
        self.studies = 0
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

    async def report(self, study: PreparedStudy, decoding: str) -> dict:
        """The report of one prepared study (batched with concurrent ones)."""
        return await self._report_batch((_checked(study), decoding))

    async def stream(self, study: PreparedStudy, decoding: str):
        """One prepared study alone (no batching), streamed: {"event": "block", "text"} per
        final block, then {"event": "report", ...the report or error dict}."""
        from echo_ray.decode.studies import report_prepared

        study = _checked(study)
        self.studies += 1
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_text(texts: list[str]) -> None:  # called in the decoding thread
            loop.call_soon_threadsafe(queue.put_nowait, ("block", texts[0]))

        async def decode() -> None:
            try:
                out = await asyncio.to_thread(
                    report_prepared, self.generator, [study], decoding=decoding,
                    on_text=on_text,
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
            yield {"event": "report", **_with_used_file(value), "batch_size": 1,
                   "replica": self.replica}
            return

    def stats(self) -> dict:
        """This replica's count of studies it was given to report (since it started)."""
        return {"studies": self.studies, "replica": self.replica}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def _report_batch(self, requests: list[tuple]) -> list[dict]:
        from echo_ray.decode.studies import report_prepared

        self.studies += len(requests)
        results: list[dict | None] = [None] * len(requests)
        by_mode: dict[str, list[int]] = {}
        for i, (_, decoding) in enumerate(requests):
            by_mode.setdefault(decoding, []).append(i)
        for decoding, idx in by_mode.items():
            out = await asyncio.to_thread(
                report_prepared, self.generator, [requests[i][0] for i in idx],
                decoding=decoding,
            )
            for i, result in zip(idx, out, strict=True):
                results[i] = {**_with_used_file(result), "batch_size": len(idx),
                              "replica": self.replica}
        return results


def _checked(study) -> PreparedStudy:
    """`study` if it is what a model replica takes: a `PreparedStudy` without its DICOM
    bytes (`shipped()`, as `StudyDecoder` sends it)."""
    if not isinstance(study, PreparedStudy) or study.source_data is not None:
        raise TypeError(f"ReportModel takes a PreparedStudy without its DICOM bytes "
                        f"(StudyDecoder's), not {type(study).__name__}"
                        f"{' with source_data' if isinstance(study, PreparedStudy) else ''}")
    return study


def _with_used_file(result: dict) -> dict:
    """A report names its file as `used_file` ("fileK", the K-th uploaded); error rows
    stay as they are."""
    if not result.get("error"):
        result["used_file"] = result.get("source_file")
    return result
