"""Classical reference denoisers (pure torch, no training): ``denoise(noisy, ctf, noise_variance)``."""
