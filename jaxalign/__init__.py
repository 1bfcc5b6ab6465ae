"""jaxalign: JAX-native safety alignment (PKU-SafeRLHF, Safe RLHF)."""

__version__ = "0.1.0"
