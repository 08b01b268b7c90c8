"""Training: train state and optimizer, the EAGLE-3 loss, VSD (E-step/M-step), trainer, checkpoints."""
