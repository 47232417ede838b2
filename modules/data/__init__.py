"""The data: finding the inputs, annotations, crops, decoding, and the synthetic demo set."""
