"""vitnqs: Vision-Transformer neural quantum states for frustrated spin models (VMC + SR)."""
from . import devices

devices.pin()  # before JAX starts: one device per rank

import logging  # noqa: E402

import jax  # noqa: E402

# JAX logs a warning for every accelerator plugin it probes and does not find (TPU on a CPU box).
logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)

# SR and energies are computed in float64 throughout.
jax.config.update("jax_enable_x64", True)

__version__ = "0.1.0"
