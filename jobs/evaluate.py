"""`ray job submit --working-dir . -- python jobs/evaluate.py --data SHARDS --out EVAL \
    --system ar=RUN_AR:ar --system teacher=RUN_RAD:multi-step [...]`

Same arguments as `echo-ray evaluate`. Inside a Ray job, RAY_ADDRESS points at the cluster and
`ray.init()` joins it.
"""

import sys

from echo_ray.cli import run


def main(argv: list[str] | None = None) -> None:
    run("evaluate", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
