"""`ray job submit --working-dir . -- python jobs/synth.py --out DIR --studies N`

Same arguments as `echo-ray synth`.
"""

import sys

from echo_ray.cli import run


def main(argv: list[str] | None = None) -> None:
    run("synth", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
