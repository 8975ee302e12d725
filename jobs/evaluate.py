"""`ray job submit --working-dir . -- python jobs/evaluate.py --data SHARDS --out EVAL \
    --system ar=RUN_AR:ar --system teacher=RUN_RAD:multi-step [...]`

Same arguments as `echo-ray evaluate`. Inside a Ray job, RAY_ADDRESS points at the cluster and
`ray.init()` joins it.
"""

from echo_ray.cli import job_entry

main = job_entry("evaluate")  # the `echo-ray evaluate` command with this script's arguments

if __name__ == "__main__":
    main()
