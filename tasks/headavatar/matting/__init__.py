"""Stage 3's matting methods behind one interface (:class:`base.Matter`), picked by :mod:`factory`."""
