"""68-point (iBUG convention) 2D face landmark detectors behind one small interface."""
