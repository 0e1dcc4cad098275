"""torch.library registration and backend dispatch, one module per op."""
