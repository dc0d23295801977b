"""The remote target: wire format, protocol, server, client, process-group transport."""
