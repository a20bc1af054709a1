"""nsr-sweep: neuron self-report sweeps over layers, neurons, heads and freeze modes."""

__version__ = "0.1.0"
