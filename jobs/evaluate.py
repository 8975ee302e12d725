"""`ray job submit --working-dir . -- python jobs/evaluate.py --data SHARDS --out EVAL \
    --system ar=RUN_AR:ar --system teacher=RUN_RAD:multi-step [...]`

Same arguments as `echo-ray evaluate`, checked before Ray starts. Paths are absolute or
s3://, and the head runs the venv's python with token auth (README "On a Ray cluster").
Inside a Ray job, RAY_ADDRESS points at the cluster and `ray.init()` joins it.
"""

from echo_ray.cli import job_entry

main = job_entry("evaluate")  # the `echo-ray evaluate` command with this script's arguments

if __name__ == "__main__":
    main()
