"""Stage 5: the mesh head of Gaussian Head Avatar (DMTet neutral head + expression/pose MLPs)."""
