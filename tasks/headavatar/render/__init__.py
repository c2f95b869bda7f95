"""Differentiable renderers (meshes for stage 5, Gaussians for stage 6) behind small interfaces."""
