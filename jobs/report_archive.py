"""`ray job submit --working-dir . -- python jobs/report_archive.py --checkpoint RUN \
    --archive s3://bucket/archive --out s3://bucket/reports [--gpus-per-actor 1 --actors 4 ...]`

Same arguments as `echo-ray report`. Inside a Ray job, RAY_ADDRESS points at the cluster and
`ray.init()` joins it. Rerunning with the same --out continues a killed run and, over a grown
archive, reports only the new studies.
"""

import sys

from echo_ray.cli import run


def main(argv: list[str] | None = None) -> None:
    run("report", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
