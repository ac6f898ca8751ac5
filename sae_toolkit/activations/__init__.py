"""Stage 2, activations: token windows + model → the HDF5 activation file (format, writer, cacher, info), and back
out as arrays (reader) or shuffled training batches (ActivationStore).
"""
