"""Raw images in, prepared arrays out: sources, the raw format, decoding, DVC versioning and the swap of
data/, the data contract, drift."""
