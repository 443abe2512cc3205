"""Device protocols: one folder each (codec twin + thin Trio session), handed a narrow Services object."""
