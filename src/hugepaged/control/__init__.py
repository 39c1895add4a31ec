"""The control socket: the seed's sysfs directory, as a Unix socket speaking JSON lines."""
