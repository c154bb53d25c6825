"""The libvirt side: the connection (errors translated once), lifecycle, status, console and threads."""
