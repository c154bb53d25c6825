"""The host: its model (local files or libvirt), the preflight checks, kernel parameters and VFIO."""
