"""Stage 6: the Gaussian head of Gaussian Head Avatar (dynamic 32-channel Gaussians + super-resolution)."""
