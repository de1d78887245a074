"""Studies: every comparison (rows x seeds of one program) from one study file, run by submitit.

    python study.py configs/studies/kd_methods.yaml                  # run or continue, local executor
    python study.py configs/studies/kd_methods.yaml --status         # one line per run
    python study.py configs/studies/kd_methods.yaml --executor slurm --partition gpu --account lab

Modules: studies.spec (the study file: its keys, validated with each program's own config loader before any
submission), studies.programs (the programs a study runs, a registry), studies.job (one run as a submitit
Checkpointable: requeued with run.resume=auto at a preemption or time limit), studies.execute (local, slurm and debug
executors, --status), studies.summary (mean ± sd over seeds, paired differences with a 95% t interval, markdown, CSV,
plot, and the generated blocks of the docs). The user guide is docs/studies.md.
"""
