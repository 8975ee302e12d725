"""`ray job submit --working-dir . -- python jobs/prepare.py --archive SRC --out DST [...]`

Same arguments as `echo-ray prepare`, checked before Ray starts. Paths are absolute or
s3://, and the head runs the venv's python with token auth (README "On a Ray cluster").
Inside a Ray job, RAY_ADDRESS points at the cluster and `ray.init()` joins it.
"""

from echo_ray.cli import job_entry

main = job_entry("prepare")  # the `echo-ray prepare` command with this script's arguments

if __name__ == "__main__":
    main()
