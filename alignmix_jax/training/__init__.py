"""The training loop (train), its jitted step (train_step) and the forward pass of each mixup
mode (mode_forward), with the checks that run beside them: divergence, and the measured effect
of alignment (alignment_effect, inert_alignment)."""
