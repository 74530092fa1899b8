"""Transports between processes: TCP endpoints, the network transport, several processes per site."""
