"""`calm submit`: a training config as a job on a remote Ray cluster."""
