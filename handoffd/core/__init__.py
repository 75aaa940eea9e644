"""The pure core: no I/O, no clock or randomness except passed in."""
