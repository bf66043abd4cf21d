"""The feed side: broker clients (connect, subscribe, heartbeat watchdog, reconnect), the
capture format of the raw stream, and the spool (the write-ahead log every received message
enters before anything else)."""
