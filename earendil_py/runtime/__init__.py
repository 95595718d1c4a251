"""The I/O shell: anyio tasks, transports, storage, control API."""
