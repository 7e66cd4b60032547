"""resonant: the high-level API over resonant_kernels (memories, agents, simulations)."""
import resonant_kernels as kernels

__all__ = ["kernels"]
