"""rtvc custom ops: fused CPU paths (numba) for the streaming hot loops."""
