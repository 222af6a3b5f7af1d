"""Training: `train` fine-tunes under any plan with optax (config, schedule, optimizer, the
step), `checkpoint` keeps, locks and resumes its orbax checkpoints."""
