"""vhost-pv: a vhost-user-blk backend whose volumes turn dangling when their container goes."""

__version__ = "0.1.0"
