"""Measuring finished images: coherence (Intra-LPIPS, Intra-Style-L), wrap seams, cube-face edges and poles.

May import ``engine``, ``products``, ``sphere`` and the leaves; never ``app``.
"""
