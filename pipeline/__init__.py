"""vitnqs: Vision-Transformer neural quantum states for frustrated spin models (VMC + SR).

Importing the package starts nothing: JAX is set up (device pinning, float64) by
`pipeline.backend`, which the computing modules import.
"""
__version__ = "0.1.0"
