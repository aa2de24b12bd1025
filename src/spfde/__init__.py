"""spfde: sparse training with progressive layer freezing and circular data sieving.

Reference implementation of "Layer Freezing & Data Sieving: Missing Pieces of a Generic
Framework for Sparse Training" (NeurIPS 2022).
"""

__version__ = "0.1.0"
