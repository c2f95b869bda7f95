"""Multiview 3DMM fitting: a BFM09-structured model fitted to 2D landmarks from calibrated cameras."""
