"""earendil_py: a relay node for an Earendil-style onion-routing overlay network."""

__version__ = "0.1.0"
