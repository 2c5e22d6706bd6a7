"""cryo-lightning: learned denoising and ab initio modelling of cryo-EM images."""

__version__ = "0.1.0"
