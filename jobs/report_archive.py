"""`ray job submit --working-dir . -- python jobs/report_archive.py --checkpoint RUN \
    --archive s3://bucket/archive --out s3://bucket/reports [--gpus-per-actor 1 --actors 4 ...]`

Same arguments as `echo-ray report`, checked before Ray starts. Paths are absolute or
s3://, and the head runs the venv's python with token auth (README "On a Ray cluster").
Inside a Ray job, RAY_ADDRESS points at the cluster and `ray.init()` joins it. Rerunning with
the same --out continues a killed run and, over a grown archive, reports only the new studies.
"""

from echo_ray.cli import job_entry

main = job_entry("report")  # the `echo-ray report` command with this script's arguments

if __name__ == "__main__":
    main()
