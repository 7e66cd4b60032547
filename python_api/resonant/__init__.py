"""resonant: the high-level API over resonant_kernels (memories, agents, simulations)."""
import resonant_kernels as kernels

from .drives import DriveClassifier
from .memory import PruneHandle, SpatialMemory

# resonant.sim (TreeWorld) needs gymnasium, an optional dependency: import it explicitly.
__all__ = ["kernels", "DriveClassifier", "PruneHandle", "SpatialMemory"]
