"""`ray job submit --working-dir . -- python jobs/train.py --stage ar --data SHARDS --out RUN [...]`

Same arguments as `echo-ray train`. Inside a Ray job, RAY_ADDRESS points at the cluster and
`ray.init()` joins it.
"""

import sys

from echo_ray.cli import run


def main(argv: list[str] | None = None) -> None:
    run("train", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
