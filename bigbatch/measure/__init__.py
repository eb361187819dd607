"""What the studies measure about the gradient and the landscape.

`GradientNoiseScale` (bigbatch.measure.gns) is the noise scale for your own training loop.
"""

from bigbatch.measure.gns import GradientNoiseScale

__all__ = ["GradientNoiseScale"]
