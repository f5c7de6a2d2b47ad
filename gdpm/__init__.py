"""gdpm: a distributed process manager with its desired state in etcd."""

__version__ = "0.1.0"
