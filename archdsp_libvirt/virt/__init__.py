"""The libvirt side: the connection (errors translated once), lifecycle (define, start, stop), inspection
and drift (read-only), post-start verification, status, console and threads."""
