"""What crosses a link between sites, as bytes: boundary codecs and the wire format of a frame. No JAX."""
