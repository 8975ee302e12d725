"""`ray job submit --working-dir . -- python jobs/trajectories.py --teacher RUN_RAD --data SHARDS \
    --out TRAJECTORIES [...]`

Same arguments as `echo-ray trajectories`. Inside a Ray job, RAY_ADDRESS points at the cluster and
`ray.init()` joins it.
"""

import sys

from echo_ray.cli import run


def main(argv: list[str] | None = None) -> None:
    run("trajectories", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
