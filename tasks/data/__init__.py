"""Raw images in, prepared arrays out: sources, the raw format, decoding, the data contract, drift."""
