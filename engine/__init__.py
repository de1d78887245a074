"""The training engine of train_student.py and train_student_rl.py (docs/extending.md), one concern per module:

schema          train_student.py's schema (Config) and validate
rl_schema       train_student_rl.py's sections (RLConfig) and validate_rl
build           what a Trainer is built from: splits, student, teacher and its cache, loaders, DDP / compile
trainer         Trainer: the epoch loop and its declared hooks (sampler factory, hooks, set_temperature)
loss            a step's loss (weighted_sum, masked_loss_terms for DDP padding), EpochTotals, teacher_targets
optim           train.amp, the optimizer, the warm-up + cosine schedule, optimizer_step
evaluation      top-1 / top-5 / CE over a loader, latency, the tests' weight traces
timing          StepTimer (data wait / compute / other), the torch.profiler trace
state           the checkpoint: trainer_state, load_trainer_state, save_checkpoints
report          the epoch line, final_report (results.json, student.safetensors), the results table, curves.png
run             run_training (the run lifecycle), resume checks, teacher.prepare, eval.checkpoint
curriculum_run  CurriculumRun: a Trainer with the curriculum, the environment and the agent
curriculum_hook Curriculum: the curriculum as a Trainer hook (its sampler, the difficulty refresh, their state)
teacher_cache   the cached teacher outputs (teacher.mode=cached)
"""
