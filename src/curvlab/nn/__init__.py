"""Models and layers: reversible networks (more layers come with their capabilities)."""

from curvlab.nn.reversible import InvertedBottleneck, ReversibleBlock, ReversibleSequence, RevMLP

__all__ = ["InvertedBottleneck", "RevMLP", "ReversibleBlock", "ReversibleSequence"]
