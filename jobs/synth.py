"""`ray job submit --working-dir . -- python jobs/synth.py --out DIR --studies N`

Same arguments as `echo-ray synth`, checked before Ray starts. Paths are absolute or
s3://, and the head runs the venv's python with token auth (README "On a Ray cluster").
"""

from echo_ray.cli import job_entry

main = job_entry("synth")  # the `echo-ray synth` command with this script's arguments

if __name__ == "__main__":
    main()
