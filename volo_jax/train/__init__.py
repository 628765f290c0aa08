"""Training: optimizer and schedule, step functions, sharding, checkpoints and the loop that wires them."""
