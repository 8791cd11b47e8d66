"""The training loop and what it is made of: the step, its loss over labelled tokens only, the batch layouts,
checkpoints and exact resume, several processes (DDP-style and FSDP2), and the run folder's rules."""
