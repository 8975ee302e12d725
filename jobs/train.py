"""`ray job submit --working-dir . -- python jobs/train.py --stage ar --data SHARDS --out RUN [...]`

Same arguments as `echo-ray train`. Inside a Ray job, RAY_ADDRESS points at the cluster and
`ray.init()` joins it.
"""

from echo_ray.cli import job_entry

main = job_entry("train")  # the `echo-ray train` command with this script's arguments

if __name__ == "__main__":
    main()
