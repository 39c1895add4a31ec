"""The control socket: what khugepaged's sysfs directory is to the kernel, as a Unix socket
speaking JSON lines."""
